"""How a run trains for its role: an independent run (`Plain`), the shared trunk of an epoch grid
(`Trunk`: constant rate up to each length's fork, never tested) or one of its cooldown branches
(`Branch`: resumes at its fork, decays, and is tested like an independent run). asr.pipeline calls
the same hooks on each; asr.branches keeps the trunk's folder, its records and its lease.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DatasetDict
from omegaconf import DictConfig
from transformers import TrainerCallback

from asr import branches, requeue
from asr.errors import UserError
from asr.records import RunRecord
from asr.tracking import MlflowRun
from asr.trainer import build_trainer

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """What a run's steps hand each other: its config, folders, tracker, and once prepared its data and model."""

    cfg: DictConfig
    output_dir: Path  # rank 0's folder: records, model, metrics
    work_dir: Path  # this process's folder (a scratch one on ranks > 0 under torchrun)
    rank: int
    tracker: MlflowRun
    callbacks: list[TrainerCallback] = field(default_factory=list)
    model: object = None
    features: DatasetDict | None = None
    processor: object = None


def best_eval(
    log_history: list[dict], after_step: int = 0, restored: str | None = None, tested: bool = False
) -> dict[str, float]:
    """The evaluation of the model that is tested (`tested`): the checkpoint load_best_model_at_end
    restored (`restored`, the Trainer's best_model_checkpoint), or the last evaluation when none was
    restored (the final model is tested); else the lowest WER. Only saved evaluations can be restored:
    with trainer=seed (evaluation every 300 steps, checkpoints every 600) a lower WER at an unsaved step
    is not the tested model. A branch counts only its own evaluations, after its fork step."""
    evals = [entry for entry in log_history if "eval_wer" in entry and entry["step"] > after_step]
    if tested and restored is not None:
        step = branches.checkpoint_step(Path(restored))
        evals = [entry for entry in evals if entry["step"] == step] or evals
    elif tested:
        evals = evals[-1:]
    if not evals:
        return {}
    best = min(evals, key=lambda entry: (entry["eval_wer"], entry["step"]))
    return {
        "eval_wer": best["eval_wer"],
        "eval_cer": best["eval_cer"],
        "eval_loss": best["eval_loss"],
        "best_step": best["step"],
    }


def for_config(cfg: DictConfig) -> Plain:
    """The role `branch.role` (set by hydra/sweeper=branches) gives this run."""
    job_role = branches.role(cfg)
    if job_role is None:
        return Plain(cfg)
    return Trunk(cfg) if job_role == "trunk" else Branch(cfg)


class Plain:
    """An independent run: trains from scratch (or from its own newest checkpoint after a requeue) and is tested."""

    name: str | None = None
    tests = True  # tested after training, and its LM step's settings checked before it

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def lease(self, job_id: str | None) -> AbstractContextManager:
        """Held for the whole run: one writer per shared folder."""
        return nullcontext()

    def run_name(self, overrides: Sequence[str]) -> str:
        return self.cfg.tracking.run_name or (" ".join(overrides) or "defaults")

    def run_to_reopen(self, record: RunRecord | None, restart: bool) -> str | None:
        """The MLflow run this start goes on with: a requeued job's own (one run for every allocation)."""
        return record.run_id if restart and record else None

    def resume_from(self, output_dir: Path, restart: bool, given: str | None) -> str | None:
        if not restart:
            return given
        found = requeue.latest_checkpoint(output_dir / "checkpoints", drop_incomplete=True)
        log.info("Requeued job %s: resuming from %s", requeue.job_id(), found or "the start (no checkpoint yet)")
        return found or given

    def opened(self, tracker: MlflowRun) -> None:
        """Tags of the role on a freshly opened (or reopened) MLflow run."""

    def check_data(self, data_fingerprint: str) -> None:
        """A shared folder's checkpoints hold only for the data they were trained on."""

    def train(self, parts: RunParts, resume: str | None) -> tuple[object, dict]:
        """Train; returns the Trainer (its model is the one to test) and the training metrics."""
        trainer, throughput = build_trainer(
            parts.cfg, parts.output_dir, parts.model, parts.features, parts.processor, parts.tracker, parts.callbacks
        )
        fork, resume = self.start(parts, trainer, resume)
        started = time.perf_counter()
        train_output = trainer.train(resume_from_checkpoint=resume)
        state = trainer.state
        metrics = {
            **best_eval(state.log_history, fork, state.best_model_checkpoint, tested=True),
            "train_loss": train_output.training_loss,
            "train_runtime": time.perf_counter() - started,
            "train_steps": state.global_step,
            "train_epochs": state.epoch,
            "train_utterances": len(parts.features["train"]),
            "train_audio_seconds": float(sum(parts.features["train"]["duration"])),
            **throughput.summary,
        }
        return trainer, metrics

    def start(self, parts: RunParts, trainer, resume: str | None) -> tuple[int, str | None]:
        """(the step this run's own evaluations start after, the checkpoint to resume from)."""
        return 0, resume

    def finished(self, parts: RunParts, metrics: dict) -> None:
        """After the results are saved."""


class _Shared(Plain):
    """A role that works in a shared trunk folder (the trunk itself, or one branch's subfolder)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.trunk = branches.TrunkFolder(cfg.branch.trunk_dir)

    def folder(self) -> Path:
        raise NotImplementedError

    def lease(self, job_id: str | None) -> AbstractContextManager:
        return branches.Lease(self.folder(), self.cfg.branch.lease_s, job_id)

    def resume_from(self, output_dir: Path, restart: bool, given: str | None) -> str | None:
        return given  # a trunk or a branch resumes from its own folder's newest checkpoint (in `train`)

    def check_data(self, data_fingerprint: str) -> None:
        self.trunk.check_data(data_fingerprint)

    def fork_of(self, trainer) -> tuple[int, int]:
        """(total steps of this run's trainer.epochs, its fork step) under trainer.cooldown_fraction."""
        total = math.ceil(self.cfg.trainer.epochs * trainer.steps_per_epoch())
        return total, branches.fork_step(total, self.cfg.trainer.cooldown_fraction)

    def prune_forks(self) -> None:
        if not self.cfg.branch.keep_forks and (pruned := self.trunk.prune_forks()):
            log.info("Deleted %d fork(s) no rerun can need (branch.keep_forks=false): %s", len(pruned), pruned)


class Branch(_Shared):
    """A cooldown branch: resumes at its fork of the trunk, decays to the end of trainer.epochs, is tested."""

    name = "branch"

    def folder(self) -> Path:
        return self.trunk.branch(self.cfg.trainer.epochs)

    def opened(self, tracker: MlflowRun) -> None:
        tracker.set_tag("branch_role", "branch")
        tracker.set_tag("branch_of", self.trunk.trunk_run_id() or "")
        tracker.set_tag("trunk_dir", str(self.trunk.path.resolve()))

    def start(self, parts: RunParts, trainer, resume: str | None) -> tuple[int, str | None]:
        """The fork step of this branch and the checkpoint it resumes from (its own if it was interrupted)."""
        cfg = self.cfg
        total, fork = self.fork_of(trainer)
        own = self.folder() / "checkpoints"
        trainer.args.output_dir = str(own)
        resume = requeue.latest_checkpoint(own, drop_incomplete=True)
        if resume is None:
            if not (self.trunk.fork(fork) / "trainer_state.json").is_file():
                raise UserError(
                    f"the trunk in {self.trunk.path} has no checkpoint at step {fork} (the fork of "
                    f"trainer.epochs={cfg.trainer.epochs:g}) yet. Fix: run the grid with hydra/sweeper=branches, "
                    "which trains the trunk before its branches"
                )
            resume = str(self.trunk.fork(fork))
            trainer.add_callback(_ForgetTrunkBest())
        log.info(
            "Branch of %g epochs: cooldown from step %d to %d, resuming from %s",
            cfg.trainer.epochs,
            fork,
            total,
            resume,
        )
        parts.tracker.set_tag("fork_step", str(fork))
        self.fork = fork
        return fork, resume

    def train(self, parts: RunParts, resume: str | None) -> tuple[object, dict]:
        trainer, metrics = super().train(parts, resume)
        metrics.update(fork_step=self.fork, branch_steps=trainer.state.global_step - self.fork)
        return trainer, metrics

    def finished(self, parts: RunParts, metrics: dict) -> None:
        record = {"run_id": parts.tracker.run_id, "output_dir": str(parts.output_dir.resolve()), **metrics}
        self.trunk.mark_done(self.cfg.trainer.epochs, record)
        self.prune_forks()


class Trunk(_Shared):
    """The shared trunk: trains at the constant rate up to the fork of trainer.epochs and keeps that
    checkpoint for the branch; one MLflow run for every trunk job of the grid. Not tested."""

    name = "trunk"
    tests = False

    def folder(self) -> Path:
        return self.trunk.path

    def run_name(self, overrides: Sequence[str]) -> str:
        return f"trunk of {' '.join(o for o in overrides if not o.startswith('trainer.epochs=')) or 'defaults'}"

    def run_to_reopen(self, record: RunRecord | None, restart: bool) -> str | None:
        return self.trunk.trunk_run_id()

    def opened(self, tracker: MlflowRun) -> None:
        if tracker.run_id:
            self.trunk.set_trunk_run_id(tracker.run_id)
            tracker.set_tag("branch_role", "trunk")
            tracker.set_tag("trunk_dir", str(self.trunk.path.resolve()))

    def train(self, parts: RunParts, resume: str | None) -> tuple[object, dict]:
        cfg, trunk = self.cfg, self.trunk
        trainer, throughput = build_trainer(
            cfg, parts.output_dir, parts.model, parts.features, parts.processor, parts.tracker, parts.callbacks
        )
        _, fork = self.fork_of(trainer)
        start = trunk.latest_start(fork)
        start_step = branches.checkpoint_step(start) if start else 0
        metrics = {"trunk_start_step": start_step, "trunk_end_step": fork, "trunk_steps": fork - start_step}
        if trunk.done(cfg.trainer.epochs):  # a rerun: this length's branch is finished, its fork not needed
            log.info("Trunk: the branch of %g epochs is done; nothing to train for its fork", cfg.trainer.epochs)
            metrics.update(trunk_start_step=fork, trunk_steps=0)
        elif start_step < fork:
            trainer.wsd = {**trainer.wsd, "hold": True}  # no decay: every branch decays on its own
            trainer.args.max_steps = fork
            trainer.args.load_best_model_at_end = False  # the trunk goes on from where it stopped, not from its best
            trainer.args.output_dir = str(trunk.checkpoints)
            trainer.add_callback(_NoEvaluationAtTheFork())
            log.info(
                "Trunk: steps %d → %d (the fork of %g epochs), in %s", start_step, fork, cfg.trainer.epochs, trunk.path
            )
            trainer.train(resume_from_checkpoint=str(start) if start else None)
            trunk.keep_fork(trunk.checkpoints / f"checkpoint-{fork}", fork)
            self.prune_forks()
            metrics.update(best_eval(trainer.state.log_history, after_step=start_step))
            metrics.update(throughput.summary)
        elif not requeue.is_complete(trunk.fork(fork)):  # the job was killed while copying it
            log.info("Trunk: keeping step %d (the fork of %g epochs) from %s", fork, cfg.trainer.epochs, start)
            trunk.keep_fork(start, fork)
        else:
            log.info(
                "Trunk: the fork of %g epochs (step %d) exists already in %s", cfg.trainer.epochs, fork, trunk.path
            )
        metrics["train_audio_seconds"] = float(sum(parts.features["train"]["duration"]))
        (parts.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        parts.tracker.log_metrics({"trunk_steps_total": fork}, step=fork)
        return trainer, metrics


class _NoEvaluationAtTheFork(TrainerCallback):
    """The Trainer evaluates at its last step, here the fork; an independent run does not evaluate there
    unless it is an eval step. That evaluation's data loader draws from torch's RNG before the fork's
    checkpoint saves it, so the branch would resume with other dropout and SpecAugment draws."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and state.global_step % state.eval_steps:
            control.should_evaluate = False


class _ForgetTrunkBest(TrainerCallback):
    """A branch starting at its fork: the trunk's best evaluation is not the branch's (its checkpoint
    is the trunk's), so load_best_model_at_end chooses among the branch's own evaluations."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.best_metric = state.best_model_checkpoint = None
        if hasattr(state, "best_global_step"):
            state.best_global_step = None
