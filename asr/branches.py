"""Epoch grids that share one trunk: warmup-stable-decay (WSD) training with cooldown branches.

With `trainer.lr_scheduler=wsd` the learning rate warms up, stays constant, and decays to zero
over the last `trainer.cooldown_fraction` of the run (shape `trainer.cooldown_shape`). Up to the
start of its decay, a run of E epochs is the same computation as any longer run with the same
settings: so an epoch grid needs one **trunk** trained at the constant rate, and for each E a
short **branch** that starts from the trunk's checkpoint at E's fork step and only cools down
(Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").

`hydra/sweeper=branches` (hydra_plugins/asr_branches_sweeper) plans the jobs (and `sweep.fidelity=branches`
a study's trials: asr/sweep/trial.py); asr/roles.py is what each job does, selected by `branch.role`,
and this module keeps the trunk's folder, its records and its lease:

- `trunk`: resume the trunk from its latest checkpoint and train it at the constant rate up to the
  fork step of `trainer.epochs`, then keep that checkpoint as the fork (`forks/step-<N>`).
- `branch`: start from the fork of `trainer.epochs` (optimizer, scheduler and RNG state included)
  and train to the end of E's schedule; evaluate, test and save like any run.

A trunk folder (`branch.trunk_dir`) is named after the settings the trunk depends on, so a rerun of
the same command finds it: the trunk resumes from its last checkpoint and finished branches are
not run again (`branches/<E>/done.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from asr.errors import ConfigError, UserError
from asr.requeue import is_complete

ROLES = ("trunk", "branch")
DONE_FILE = "done.json"
LOCK_FILE = "lock.json"  # the job writing a trunk (or a branch) folder now
TRUNK_FILE = "trunk.json"  # the trunk's MLflow run, reopened by each trunk job


def role(cfg: DictConfig) -> str | None:
    """`branch.role` of this job (None for a plain run), checked against the schedule it needs."""
    value = cfg.branch.role
    if value is None:
        return None
    if value not in ROLES:
        raise ConfigError(f"branch.role={value!r} is not a role. Fix: branch.role=trunk or branch (or leave it null)")
    if not cfg.branch.trunk_dir:
        raise ConfigError("branch.role is set without branch.trunk_dir. Fix: run the grid with hydra/sweeper=branches")
    check_settings(cfg)
    return value


def check_settings(cfg: DictConfig) -> None:
    """What a shared trunk needs: the WSD schedule, whole epochs, and a warm-up that does not depend on the length."""
    trainer = cfg.trainer
    if trainer.lr_scheduler != "wsd":
        raise ConfigError(
            "a shared trunk needs the warmup-stable-decay schedule, not "
            f"trainer.lr_scheduler={trainer.lr_scheduler}. Fix: add trainer.lr_scheduler=wsd"
        )
    if trainer.max_steps is not None:
        raise ConfigError(
            f"a branch grid runs whole epochs, but trainer.max_steps={trainer.max_steps} would cut every length "
            "to that. Fix: add trainer.max_steps=null"
        )
    if trainer.warmup_steps is None and trainer.warmup_ratio:
        raise ConfigError(
            "a shared trunk needs the same warm-up for every length, but trainer.warmup_ratio depends on it. "
            "Fix: set the warm-up in steps, e.g. trainer.warmup_steps=50"
        )
    decay_steps(1, trainer.cooldown_fraction)  # a fraction in (0, 1]


def decay_steps(total_steps: int, cooldown_fraction: float) -> int:
    """Steps of the final decay of a WSD run of `total_steps` (at least 1)."""
    if (
        isinstance(cooldown_fraction, bool)
        or not isinstance(cooldown_fraction, (int, float))
        or not 0 < cooldown_fraction <= 1
    ):
        raise ConfigError(
            f"trainer.cooldown_fraction={cooldown_fraction} must be in (0, 1]. Fix: e.g. trainer.cooldown_fraction=0.2"
        )
    return max(1, round(cooldown_fraction * total_steps))


def fork_step(total_steps: int, cooldown_fraction: float) -> int:
    """The step where a WSD run of `total_steps` leaves the constant rate: its branch starts there."""
    return total_steps - decay_steps(total_steps, cooldown_fraction)


def trunk_key(cfg: DictConfig) -> str:
    """What a trunk depends on: the composed config without the run length, the branch role and tracking."""
    import hashlib

    container = OmegaConf.to_container(cfg, resolve=False)
    for key in ("branch", "hydra", "tracking", "plan", "optimized_metric"):
        container.pop(key, None)
    container.get("trainer", {}).pop("epochs", None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class TrunkFolder:
    """A trunk's files: checkpoints/ (its own, rotated), forks/step-<N>/ (kept), branches/<E>/, trunk.json."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def fork(self, step: int) -> Path:
        return self.path / "forks" / f"step-{step}"

    def branch(self, epochs: float) -> Path:
        return self.path / "branches" / f"{epochs:g}"

    def latest_start(self, until_step: int) -> Path | None:
        """The furthest checkpoint (a fork or the trunk's own) at or before `until_step`: where the trunk resumes."""
        candidates = []
        for folder in (self.path / "forks", self.checkpoints):
            for child in folder.glob("*-*") if folder.is_dir() else ():
                step = _step_of(child)
                if step is not None and step <= until_step and is_complete(child):
                    candidates.append((step, child))
        return max(candidates)[1] if candidates else None

    def keep_fork(self, checkpoint: Path, step: int) -> Path:
        """Copy the trunk's checkpoint at `step` to forks/ (out of reach of checkpoint rotation)."""
        target = self.fork(step)
        if not target.exists():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(checkpoint, partial)
            partial.rename(target)  # a fork either exists whole or not at all
        return target

    def _record(self) -> dict:
        record = self.path / TRUNK_FILE
        return json.loads(record.read_text()) if record.is_file() else {}

    def _update(self, **values) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / TRUNK_FILE).write_text(json.dumps({**self._record(), **values}))

    def prune_forks(self) -> list[Path]:
        """Delete the forks a rerun can no longer need: those whose branch is done and that a newer fork
        has passed (the trunk resumes from its furthest fork, never from an older one). ~7 GB each for
        w2v-bert-2.0 with its optimizer state. Returns what was deleted."""
        forks = sorted((checkpoint_step(p), p) for p in (self.path / "forks").glob("step-*") if _step_of(p) is not None)
        done = {
            json.loads(record.read_text()).get("fork_step")
            for record in (self.path / "branches").glob(f"*/{DONE_FILE}")
        }
        pruned = [path for step, path in forks[:-1] if step in done]
        for path in pruned:
            shutil.rmtree(path, ignore_errors=True)
        return pruned

    def trunk_run_id(self) -> str | None:
        return self._record().get("run_id")

    def set_trunk_run_id(self, run_id: str) -> None:
        self._update(run_id=run_id)

    def check_data(self, data_fingerprint: str) -> None:
        """The trunk folder is named after the config, not the data: a changed manifest or audio behind
        the same config must not resume a trunk (or skip branches) trained on the old data."""
        known = self._record().get("dataset_fingerprint")
        if known is None:
            self._update(dataset_fingerprint=data_fingerprint)
        elif known != data_fingerprint:
            raise ConfigError(
                f"the shared trunk in {self.path} was trained on other data (dataset fingerprint {known}, now "
                f"{data_fingerprint}): its checkpoints and finished branches do not apply. Fix: move that folder "
                "away to train a new trunk, or point the dataset back at the data it was trained on"
            )

    def done(self, epochs: float) -> dict | None:
        record = self.branch(epochs) / DONE_FILE
        return json.loads(record.read_text()) if record.is_file() else None

    def mark_done(self, epochs: float, record: dict) -> None:
        folder = self.branch(epochs)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DONE_FILE).write_text(json.dumps(record, indent=2))


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a checkpoint folder was saved at (`checkpoint-<N>` or `step-<N>`)."""
    step = _step_of(folder)
    if step is None:
        raise ValueError(f"{folder} is not a checkpoint folder")
    return step


def _step_of(folder: Path) -> int | None:
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


class FolderBusyError(UserError, RuntimeError):
    """Another job is writing this trunk or branch (a rerun while the first sweep's jobs still run)."""


class Lease:
    """One job at a time writes a trunk (or a branch) folder: `lock.json`, created with O_EXCL (atomic on
    local disks and NFS v3+), names the holder (host, pid, SLURM job) and is renewed every lease_s / 6
    seconds. A lease whose holder is a dead process on this host, or that nobody renewed for `lease_s`
    seconds (a killed job on another node), is taken over; a live one is a one-line error naming it."""

    def __init__(self, folder: Path, lease_s: float, job_id: str | None = None) -> None:
        self.file, self.lease_s = Path(folder) / LOCK_FILE, float(lease_s)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id}
        self._stop = threading.Event()

    def __enter__(self) -> Lease:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = self._holder() or {}
            if not self._expired(holder):
                if not holder:  # being written by its creator this very moment
                    time.sleep(0.1)
                    continue
                job = f"SLURM job {holder['job']}, " if holder.get("job") else ""
                raise FolderBusyError(
                    f"{self.file.parent} is being written by {job}pid {holder.get('pid')} on {holder.get('host')} "
                    f"(lock renewed {time.time() - self.file.stat().st_mtime:.0f} s ago). Fix: wait for that job "
                    "to end, or cancel it, then rerun"
                )
            self.file.unlink(missing_ok=True)  # a dead holder's: take it over
        threading.Thread(target=self._renew, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._holder() == self.me:
            self.file.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as out:
            json.dump(self.me, out)
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None  # gone, or being written: looked at again

    def _expired(self, holder: dict) -> bool:
        try:
            age = time.time() - self.file.stat().st_mtime
        except OSError:
            return True
        if age > self.lease_s or (holder.get("job") and holder.get("job") == self.me["job"]):
            return True  # nobody renewed it, or this job held it before SLURM requeued it
        if holder.get("host") == self.me["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                pass
        return False

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 6):
            try:
                os.utime(self.file)
            except OSError:
                return
