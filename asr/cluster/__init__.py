"""Running the project on SLURM: a local one-node cluster for tests and trials, and job-state checks for the
sweep driver."""
