"""Optuna studies over Hydra configs: search spaces in Hydra's grammar, pruning on eval WER,
asynchronous workers sharing one storage, resume after a crash, an MLflow parent per study."""

from asr.sweep.driver import run_study
from asr.sweep.spec import SweepSpec

__all__ = ["SweepSpec", "run_study"]
