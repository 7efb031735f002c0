"""A job that SLURM stops before its training ends (time limit, preemption, `scontrol requeue`) finishes
in a later allocation, in the same MLflow run, from where it stopped.

Under submitit (`hydra/launcher=slurm`, the sweep's SLURM workers, `hydra/launcher=local_parallel`)
SLURM sends a warning signal (USR2) `hydra.launcher.signal_delay_s` seconds before the time limit, and
on preemption where the cluster is set up to. submitit's own handler requeues the job at once, in the
middle of a step and without a checkpoint, so every allocation would start again from the last
periodic checkpoint. `Interruption` only notes the signal: at the end of the current optimizer step
the Trainer saves a full checkpoint and stops (`CheckpointAndRequeue`), then submitit's handler
requeues the job (or refuses, when `max_num_timeout` is used up). The next allocation runs the same
job (same job id, same output folder): `is_restart` sees it, and the run resumes from its newest
complete checkpoint in the MLflow run it had.

SIGTERM (scancel, `scontrol requeue`, the kill at the time limit) ends the process with SystemExit, so
the MLflow run is closed KILLED instead of staying RUNNING forever (submitit ignores SIGTERM); a job
that SLURM starts again reopens it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from transformers import TrainerCallback

from asr.records import RunRecord

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # written last by transformers' Trainer._save_checkpoint


def job_id() -> str | None:
    """This process's submitit job id (`<array id>_<task>` for array tasks), None outside submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    return submitit.JobEnvironment().job_id


def is_restart(record: RunRecord | None) -> bool:
    """True when the run record in the output folder was written by this very job in an earlier
    allocation (SLURM keeps the job id when it requeues a job)."""
    current = job_id()
    return bool(record and current and record.job_id == current)


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint is complete once its trainer_state.json, which transformers writes after the
    weights, optimizer, scheduler and RNG states, is there and parses."""
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(folder: Path, drop_incomplete: bool = False) -> str | None:
    """The newest complete `checkpoint-<step>` in `folder`. `drop_incomplete`: delete the newer,
    incomplete ones a kill during a save left (they would count in checkpoint rotation)."""
    steps = {int(p.name.rsplit("-", 1)[-1]): p for p in Path(folder).glob("checkpoint-*") if p.name[11:].isdigit()}
    complete = [step for step in sorted(steps) if is_complete(steps[step])]
    if drop_incomplete:
        for step in sorted(steps):
            if step not in complete and (not complete or step > complete[-1]):
                log.warning("removing %s: its save was interrupted", steps[step])
                shutil.rmtree(steps[step], ignore_errors=True)
    return str(steps[complete[-1]]) if complete else None


def _is_submitit_handler(handler) -> bool:
    owner = getattr(handler, "__self__", None)
    return type(owner).__module__.startswith("submitit.")


class Interruption:
    """Signal handling for one run (a context manager; a no-op off the main thread).

    - the warning signal during training: noted; `CheckpointAndRequeue` saves and hands over;
      outside training (data preparation, test): handed to submitit at once (nothing to save).
    - SIGTERM: SystemExit, unless this job is already being requeued.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the warning signal, once received during training
        self.training = False
        self.requeuing = False  # submitit was asked to requeue this job
        self._submitit = None  # submitit's handler of the warning signal
        self._saved: dict[int, object] = {}

    def __enter__(self) -> Interruption:
        if threading.current_thread() is not threading.main_thread():
            return self
        if os.environ.get("SUBMITIT_EXECUTOR"):
            import submitit

            warning = submitit.JobEnvironment._usr_sig()
            if _is_submitit_handler(signal.getsignal(warning)):
                self._submitit = signal.getsignal(warning)
                self._install(warning, self._on_warning)
        term = signal.getsignal(signal.SIGTERM)
        if term is signal.SIG_DFL or _is_submitit_handler(term):
            self._install(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()

    @property
    def callback(self) -> TrainerCallback:
        return CheckpointAndRequeue(self)

    def _install(self, signum: int, handler) -> None:
        self._saved[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)

    def _on_warning(self, signum, frame) -> None:
        if self.training:
            log.warning("Signal %s: saving a checkpoint after this step, then requeueing the job", signum)
            self.signum = signum
        else:
            self.hand_over(signum)

    def _on_term(self, signum, frame) -> None:
        if self.requeuing:  # `scontrol requeue` sends it to the job that asked for it
            return
        log.warning("SIGTERM: stopping (scancel, requeue or the time limit)")
        sys.exit(128 + signum)

    def hand_over(self, signum: int | None = None) -> None:
        """submitit requeues the job and exits (SystemExit), or raises UncompletedJobError when it may
        not (`max_num_timeout` used up): then the job fails with that reason; its checkpoint stays."""
        self.requeuing = True
        try:
            self._submitit(signum or self.signum, None)
        except Exception:
            self.requeuing = False
            raise


class CheckpointAndRequeue(TrainerCallback):
    """After the warning signal: checkpoint at the end of this step, stop training, requeue the job."""

    def __init__(self, interruption: Interruption) -> None:
        self.interruption = interruption

    def on_train_begin(self, args, state, control, **kwargs):
        self.interruption.training = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.interruption.signum is not None:
            control.should_save = True
            control.should_training_stop = True
            args.load_best_model_at_end = False  # the next allocation goes on from here, not from the best

    def on_train_end(self, args, state, control, **kwargs):
        self.interruption.training = False
        if self.interruption.signum is not None:
            log.warning("Checkpoint saved at step %d; requeueing the job", state.global_step)
            self.interruption.hand_over()
