"""The pipeline, top to bottom: load → normalise → vocab → features → model → train → test → save."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from datasets import DatasetDict
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback, set_seed

from asr import branches, requeue, threads
from asr.audit import run_audit
from asr.data import fingerprint
from asr.data.text import NORMALIZATION_VERSION
from asr.errors import UserError
from asr.inference import write_predictions
from asr.lm.after_training import check_before_training as check_lm_before_training
from asr.metrics import decode_predictions
from asr.model import build_model
from asr.prepare import prepare
from asr.throughput import device_name
from asr.tracking import MlflowRun, SweepJob
from asr.trainer import RunPruned, build_trainer, configure_torch, ddp_on_cpu

log = logging.getLogger(__name__)

RUN_RECORD = "mlflow_run.json"  # in a run's output folder: its MLflow run id, tracking URI and submitit job id


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


def _shared_output_dir(output_dir: Path) -> tuple[Path, int]:
    """(rank 0's output folder, this process's rank): under torchrun every rank uses rank 0's folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return output_dir, 0
    from accelerate import PartialState  # sets up the process group (gloo on CPU, nccl on GPU)
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=ddp_on_cpu())
    shared = broadcast_object_list([str(output_dir)], from_process=0)[0]
    return Path(shared), state.process_index


@contextmanager
def _main_process_first():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=ddp_on_cpu()).main_process_first():
        yield


def _run_record(output_dir: Path) -> dict | None:
    """mlflow_run.json of an earlier start of this run: its MLflow run and the submitit job that wrote it."""
    path = output_dir / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(
    cfg: DictConfig,
    output_dir: str | Path,
    overrides: Sequence[str] = (),
    callbacks: Sequence[TrainerCallback] = (),
    resume_from_checkpoint: str | None = None,
    sweep_job: SweepJob | None = None,
) -> dict[str, float]:
    """Train and test one configuration; returns metrics.json's content (eval_wer is what sweeps minimise).
    A shared trunk's job (or a branch's) first takes that folder's lease: one writer at a time."""
    job_role = branches.role(cfg)
    # SLURM's signals are handled from the start: a job requeued or cancelled while it prepares its data
    # must not leave a RUNNING MLflow run behind
    with requeue.Interruption() as interruption:
        if job_role is None:
            return _run(cfg, output_dir, overrides, callbacks, resume_from_checkpoint, sweep_job, interruption)
        trunk = branches.TrunkFolder(cfg.branch.trunk_dir)
        folder = trunk.path if job_role == "trunk" else trunk.branch(cfg.trainer.epochs)
        with branches.Lease(folder, cfg.branch.lease_s, requeue.job_id()):
            return _run(cfg, output_dir, overrides, callbacks, resume_from_checkpoint, sweep_job, interruption)


def _run(
    cfg: DictConfig,
    output_dir: str | Path,
    overrides: Sequence[str],
    callbacks: Sequence[TrainerCallback],
    resume_from_checkpoint: str | None,
    sweep_job: SweepJob | None,
    interruption: requeue.Interruption,
) -> dict[str, float]:
    """`run`'s work, once its lease (if any) is held.

    The MLflow run opens first, so a job that fails on its data is recorded as FAILED too.
    `callbacks` join the Trainer's (a sweep's pruning callback); one raising `RunPruned` stops the
    run, which is closed FINISHED with the tag `trial_state=PRUNED` and keeps its curves.
    `sweep_job`: the grid job or study trial this run is (its MLflow run becomes a child run).
    """
    configure_torch(cfg.trainer)  # first: the CUDA allocator reads its settings once
    output_dir, rank = _shared_output_dir(Path(output_dir))
    # under torchrun only rank 0 records the run and writes outputs; the others work in a scratch folder
    work_dir = output_dir if rank == 0 else Path(tempfile.mkdtemp(prefix=f"asr-rank{rank}-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    job_role = branches.role(cfg)
    overrides = [o for o in overrides if not o.startswith("branch.")]  # the sweeper's bookkeeping, not a setting
    run_name = cfg.tracking.run_name or (" ".join(overrides) or "defaults")
    if job_role == "trunk":
        run_name = f"trunk of {' '.join(o for o in overrides if not o.startswith('trainer.epochs=')) or 'defaults'}"
    tracking_cfg = cfg.tracking if rank == 0 else OmegaConf.create({"enabled": False})
    trunk = branches.TrunkFolder(cfg.branch.trunk_dir) if job_role else None
    record = _run_record(output_dir)
    restart = requeue.is_restart(record)  # SLURM requeued this job (time limit, preemption): go on where it stopped
    if restart and job_role is None:  # a trunk or a branch resumes from its own folder's latest checkpoint
        found = requeue.latest_checkpoint(output_dir / "checkpoints", drop_incomplete=True)
        resume_from_checkpoint = found or resume_from_checkpoint
        log.info("Requeued job %s: resuming from %s", requeue.job_id(), found or "the start (no checkpoint yet)")
    reopen = trunk.trunk_run_id() if job_role == "trunk" else (record["run_id"] if restart else None)
    tracker = MlflowRun(
        tracking_cfg,
        run_name,
        {"dataset": cfg.dataset.name, "model": cfg.model.name, "overrides": " ".join(overrides)},
        sweep=sweep_job if rank == 0 else None,
        reopen=reopen,  # one MLflow run for the whole trunk, and for every allocation of a requeued job
    )
    if job_role == "trunk" and tracker.run_id:
        trunk.set_trunk_run_id(tracker.run_id)
        tracker.set_tag("branch_role", "trunk")
        tracker.set_tag("trunk_dir", str(trunk.path.resolve()))
    if restart and tracker.reopened:
        tracker.set_tag("restarts", str(int(tracker.tag("restarts") or 0) + 1))
    if tracker.run_id:  # lets `asr.evaluate run_dir=...` file its results next to this run
        (output_dir / RUN_RECORD).write_text(
            json.dumps(
                {"run_id": tracker.run_id, "tracking_uri": tracker.client.tracking_uri, "job_id": requeue.job_id()}
            )
        )
        tracker.set_tag("output_dir", str(output_dir.resolve()))
    callbacks = [*callbacks, interruption.callback]
    with threads.restored():  # a pruned trial leaves no reduced thread count to the next one
        try:
            if not tracker.reopened:
                tracker.log_config(cfg)
            set_seed(cfg.seed)
            with _main_process_first():  # rank 0 speaks the corpus and fills the feature cache; the others read it
                splits, features, processor = prepare(cfg, work_dir)
            settings = {
                "normalization": NORMALIZATION_VERSION,
                "text": OmegaConf.to_container(cfg.dataset.text),
                "audit": OmegaConf.to_container(cfg.audit),
            }
            data_fingerprint = fingerprint(splits, settings)
            tracker.set_tag("dataset_fingerprint", data_fingerprint)
            tracker.set_tag("device", device_name())  # plan=true compares throughput on the same kind of device
            if trunk is not None:  # a trunk's checkpoints and finished branches hold for the data it saw
                trunk.check_data(data_fingerprint)
            tracker.set_tag("split_sizes", " ".join(f"{name}={len(rows)}" for name, rows in splits.items()))
            model = build_model(
                cfg.model, cfg.regularization, processor.tokenizer, cfg.trainer.get("attn_implementation")
            )
            features, audit = run_audit(
                features,
                cfg.audit,
                model.config,
                work_dir / "data_audit.json",
                allow_missing=cfg.dataset.get("allow_missing_audio", False),
            )
            if not tracker.reopened:
                tracker.log_metrics(
                    {
                        "audit_quarantined": audit["quarantined"],
                        **{f"audit_{k}": v for k, v in audit["by_reason"].items()},
                    },
                    step=0,
                )
                tracker.log_artifact(output_dir / "data_audit.json")
            if job_role != "trunk":  # a run that tests: its LM step's settings are checked before training
                check_lm_before_training(cfg, features)
            if job_role == "trunk":
                metrics = _train_trunk(cfg, output_dir, model, features, processor, tracker, trunk, callbacks)
            else:
                metrics = _train_and_test(
                    cfg, output_dir, model, features, processor, tracker, callbacks, resume_from_checkpoint, rank, trunk
                )
        except RunPruned:
            tracker.set_tag("trial_state", "PRUNED")
            tracker.end("FINISHED")
            raise
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (scancel, the time limit), or a requeue
            if interruption.requeuing:  # the next allocation reopens this run
                tracker.set_tag("requeued", "true")
                tracker.end("SCHEDULED")
            else:
                tracker.end("KILLED")
            raise
        except Exception as err:
            tracker.set_tag(
                "error", (str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}")[:5000]
            )
            tracker.end("FAILED")
            raise
    tracker.end("FINISHED")
    return metrics


def _train_and_test(
    cfg,
    output_dir: Path,
    model,
    features: DatasetDict,
    processor,
    tracker: MlflowRun,
    callbacks: Sequence[TrainerCallback] = (),
    resume_from_checkpoint: str | None = None,
    rank: int = 0,
    trunk: branches.TrunkFolder | None = None,
) -> dict[str, float]:
    """Train, then test and save; `trunk`: this run is a branch of that trunk, starting at its fork."""
    trainer, throughput = build_trainer(cfg, output_dir, model, features, processor, tracker, callbacks)
    fork = 0
    if trunk is not None:
        fork, resume_from_checkpoint = _start_branch(cfg, trainer, tracker, trunk)
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    train_runtime = time.perf_counter() - started
    trainer.save_model(
        str(output_dir / "model")
    )  # the best checkpoint, restored by load_best_model_at_end (rank 0 writes)
    test = trainer.predict(features["test"], metric_key_prefix="test")  # every rank takes part, and gets every row
    references, hypotheses = decode_predictions(processor.tokenizer, test.predictions, test.label_ids)

    metrics = {
        **best_eval(trainer.state.log_history, fork, trainer.state.best_model_checkpoint, tested=True),
        **{k: v for k, v in test.metrics.items() if k.startswith("test_") and "per_second" not in k},
        "train_loss": train_output.training_loss,
        "train_runtime": train_runtime,
        "train_steps": trainer.state.global_step,
        "train_epochs": trainer.state.epoch,
        "train_utterances": len(features["train"]),
        "train_audio_seconds": float(sum(features["train"]["duration"])),
        **throughput.summary,
        **({"fork_step": fork, "branch_steps": trainer.state.global_step - fork} if trunk is not None else {}),
    }
    if rank != 0:
        return metrics
    processor.save_pretrained(str(output_dir / "model"))
    write_predictions(
        output_dir / "predictions_test.jsonl",
        features["test"]["id"],
        features["test"]["speaker"],
        references,
        hypotheses,
    )
    step = trainer.state.global_step
    _save_results(output_dir, metrics, tracker, step, ("metrics.json", "predictions_test.jsonl", "model/vocab.json"))
    if cfg.get("lm") and cfg.lm.after_training:  # greedy and n-gram LM test WER side by side (asr/lm/after_training.py)
        from asr.lm.after_training import decode_test_with_lm

        try:
            lm_metrics = decode_test_with_lm(cfg, output_dir, trainer.model, features, processor)
        except Exception as err:  # noqa: BLE001  (the trained model and its metrics are kept whatever the LM does)
            log.error("LM decoding failed (%s: %s); the run's model and metrics are kept", type(err).__name__, err)
            tracker.set_tag("lm_error", f"{type(err).__name__}: {err}"[:5000])
        else:
            metrics.update(lm_metrics)
            files = ("metrics.json", "predictions_test_lm.jsonl", "model/lm/lm.json")
            _save_results(output_dir, metrics, tracker, step, files, logged=lm_metrics)
    if trunk is not None:
        trunk.mark_done(
            cfg.trainer.epochs,
            {"run_id": tracker.run_id, "output_dir": str(output_dir.resolve()), **metrics},
        )
        _prune_forks(cfg, trunk)
    log.info(
        "eval WER %.4f (best, step %s) | test WER %.4f, CER %.4f | %s",
        metrics.get("eval_wer", float("nan")),
        metrics.get("best_step"),
        metrics["test_wer"],
        metrics["test_cer"],
        output_dir,
    )
    return metrics


def _save_results(
    output_dir: Path, metrics: dict, tracker: MlflowRun, step: int, files: Sequence[str], logged: dict | None = None
) -> None:
    """metrics.json; the test and best-evaluation metrics of `logged` (all by default) in MLflow; the files."""
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    logged = metrics if logged is None else logged
    tracker.log_metrics({k: v for k, v in logged.items() if k.startswith("test_")}, step=step)
    tracker.log_metrics({f"best_{k}": v for k, v in logged.items() if k in ("eval_cer", "eval_loss")}, step=step)
    for name in files:
        tracker.log_artifact(output_dir / name)


def _prune_forks(cfg: DictConfig, trunk: branches.TrunkFolder) -> None:
    if not cfg.branch.keep_forks and (pruned := trunk.prune_forks()):
        log.info("Deleted %d fork(s) no rerun can need (branch.keep_forks=false): %s", len(pruned), pruned)


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


def _fork_of(cfg: DictConfig, trainer) -> tuple[int, int]:
    """(total steps of this run's trainer.epochs, its fork step) under trainer.cooldown_fraction."""
    total = math.ceil(cfg.trainer.epochs * trainer.steps_per_epoch())
    return total, branches.fork_step(total, cfg.trainer.cooldown_fraction)


def _start_branch(cfg: DictConfig, trainer, tracker: MlflowRun, trunk: branches.TrunkFolder) -> tuple[int, str]:
    """The fork step of this branch and the checkpoint it resumes from (its own if it was interrupted)."""
    total, fork = _fork_of(cfg, trainer)
    own = trunk.branch(cfg.trainer.epochs) / "checkpoints"
    trainer.args.output_dir = str(own)
    resume = requeue.latest_checkpoint(own, drop_incomplete=True)
    if resume is None:
        if not (trunk.fork(fork) / "trainer_state.json").is_file():
            raise UserError(
                f"the trunk in {trunk.path} has no checkpoint at step {fork} (the fork of "
                f"trainer.epochs={cfg.trainer.epochs:g}) yet. Fix: run the grid with hydra/sweeper=branches, "
                "which trains the trunk before its branches"
            )
        resume = str(trunk.fork(fork))
        trainer.add_callback(_ForgetTrunkBest())
    log.info(
        "Branch of %g epochs: cooldown from step %d to %d, resuming from %s", cfg.trainer.epochs, fork, total, resume
    )
    tracker.set_tag("branch_role", "branch")
    tracker.set_tag("branch_of", trunk.trunk_run_id() or "")
    tracker.set_tag("fork_step", str(fork))
    tracker.set_tag("trunk_dir", str(trunk.path.resolve()))
    return fork, resume


def _train_trunk(
    cfg: DictConfig,
    output_dir: Path,
    model,
    features: DatasetDict,
    processor,
    tracker: MlflowRun,
    trunk: branches.TrunkFolder,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, float]:
    """Train the trunk at the constant rate up to the fork of trainer.epochs and keep that checkpoint."""
    trainer, throughput = build_trainer(cfg, output_dir, model, features, processor, tracker, callbacks)
    _, fork = _fork_of(cfg, trainer)
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
        _prune_forks(cfg, trunk)
        metrics.update(best_eval(trainer.state.log_history, after_step=start_step))
        metrics.update(throughput.summary)
    elif not requeue.is_complete(trunk.fork(fork)):  # the job was killed while copying it
        log.info("Trunk: keeping step %d (the fork of %g epochs) from %s", fork, cfg.trainer.epochs, start)
        trunk.keep_fork(start, fork)
    else:
        log.info("Trunk: the fork of %g epochs (step %d) exists already in %s", cfg.trainer.epochs, fork, trunk.path)
    metrics["train_audio_seconds"] = float(sum(features["train"]["duration"]))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    tracker.log_metrics({"trunk_steps_total": fork}, step=fork)
    return metrics
