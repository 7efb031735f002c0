"""Running the project on SLURM: job-state checks for the sweep driver (the one-node cluster for tests and
trials is asr.devcluster, which nothing in the package imports)."""
