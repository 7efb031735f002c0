"""hydra/launcher=slurm: the submitit SLURM launcher waiting with asr.cluster.jobs (see submitit_launcher.py)."""
