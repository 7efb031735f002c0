"""The small JSON records that tie folders to MLflow runs, read and written in one place.

- `mlflow_run.json` in a run's output folder (`RunRecord`): its MLflow run, the tracking URI, and the
  submitit job that wrote it. `asr.evaluate run_dir=...` files its results next to that run; a job
  SLURM requeued (same job id) reopens it.
- `mlflow_sweep.json` in a `-m` grid's sweep folder (`SweepRecord`): the parent run every job of the
  grid files itself under, and which keys the grid sweeps; a job's place in its grid or study is a
  `SweepJob`.

A shared trunk's own records (`trunk.json`, `done.json`) are kept by `asr.branches.TrunkFolder`; a
study's `sweep_spec.json` by `asr.sweep.spec.SweepSpec`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_RECORD = "mlflow_run.json"
SWEEP_RECORD = "mlflow_sweep.json"


@dataclass
class RunRecord:
    run_id: str
    tracking_uri: str
    job_id: str | None = None  # the submitit job (SLURM keeps it when it requeues the job)

    @classmethod
    def read(cls, folder: Path) -> RunRecord | None:
        """The record in `folder`, or None when there is none (or it is unreadable: a start killed mid-write)."""
        try:
            data = json.loads((Path(folder) / RUN_RECORD).read_text())
            return cls(data["run_id"], data.get("tracking_uri", ""), data.get("job_id"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, folder: Path) -> None:
        (Path(folder) / RUN_RECORD).write_text(json.dumps(asdict(self)))


@dataclass
class SweepRecord:
    parent_run_id: str
    tracking_uri: str
    swept_keys: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepRecord | None:
        try:
            data = json.loads((Path(sweep_dir) / SWEEP_RECORD).read_text())
            return cls(data["parent_run_id"], data["tracking_uri"], list(data.get("swept_keys", [])))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, sweep_dir: Path) -> None:
        (Path(sweep_dir) / SWEEP_RECORD).write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def remove(sweep_dir: Path) -> None:
        """A new grid in an old sweep folder: its jobs must never file themselves under the old parent."""
        (Path(sweep_dir) / SWEEP_RECORD).unlink(missing_ok=True)


@dataclass(frozen=True)
class SweepJob:
    """A run's place in a grid or study (asr.multirun for `-m`, asr.sweep for trials): makes it a child run."""

    parent_run_id: str
    job_num: int
    swept: dict[str, str]  # swept key → this job's value, e.g. {"trainer.epochs": "8"}
    tags: dict[str, str] = field(default_factory=dict)  # e.g. optuna_study / optuna_trial
    sweep_id: str | None = None  # the grid's or study's parent when the parent here is a trial's run (nested)
