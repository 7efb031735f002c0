"""`hydra/sweeper=branches`: an epoch grid that shares one WSD trunk (see branches_sweeper.py)."""
