"""`hydra/sweeper=optuna`: the asr.sweep engine behind Hydra's multirun door (see optuna_sweeper.py)."""
