"""One run, top to bottom: prepare the data → build the model → audit the data → train (as its role
says: asr.roles) → test → record. `run` is what train.py, grid jobs and study trials call."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback, set_seed

from asr import averaging, requeue, roles, threads
from asr.audit import run_audit
from asr.branches import checkpoint_step, fork_step
from asr.data import fingerprint
from asr.data.text import NORMALIZATION_VERSION
from asr.errors import RunPruned, UserError
from asr.inference import write_predictions
from asr.lm.after_training import check_before_training as check_lm_before_training
from asr.metrics import decode_predictions
from asr.model import build_model
from asr.prepare import prepare
from asr.records import RunRecord, SweepJob
from asr.roles import RunParts
from asr.throughput import device_name
from asr.torch_setup import configure_torch, ddp_on_cpu
from asr.tracking import MlflowRun

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig,
    output_dir: str | Path,
    overrides: Sequence[str] = (),
    callbacks: Sequence[TrainerCallback] = (),
    resume_from_checkpoint: str | None = None,
    sweep_job: SweepJob | None = None,
) -> dict[str, float]:
    """Train and test one configuration; returns metrics.json's content (eval_wer is what sweeps minimise).

    The MLflow run opens first, so a job that fails on its data is recorded as FAILED too.
    `callbacks` join the Trainer's (a sweep's pruning callback); one raising `RunPruned` stops the
    run, which is closed FINISHED with the tag `trial_state=PRUNED` and keeps its curves.
    `sweep_job`: the grid job or study trial this run is (its MLflow run becomes a child run).
    A shared trunk's job (or a branch's) holds that folder's lease throughout: one writer at a time.
    """
    role = roles.for_config(cfg)
    # SLURM's signals are handled from the start: a job requeued or cancelled while it prepares its data
    # must not leave a RUNNING MLflow run behind
    with requeue.Interruption() as interruption, role.lease(requeue.job_id()):
        configure_torch(cfg.trainer)  # first: the CUDA allocator reads its settings once
        output_dir, rank = _shared_output_dir(Path(output_dir))
        output_dir.mkdir(parents=True, exist_ok=True)
        record = RunRecord.read(output_dir)
        restart = requeue.is_restart(record)  # SLURM requeued this job (time limit, preemption): go on where it stopped
        resume = role.resume_from(output_dir, restart, resume_from_checkpoint)
        overrides = [o for o in overrides if not o.startswith("branch.")]  # the sweeper's bookkeeping, not a setting
        tracker = MlflowRun(
            cfg.tracking if rank == 0 else OmegaConf.create({"enabled": False}),  # under torchrun rank 0 records
            role.run_name(overrides),
            {"dataset": cfg.dataset.name, "model": cfg.model.name, "overrides": " ".join(overrides)},
            sweep=sweep_job if rank == 0 else None,
            reopen=role.run_to_reopen(record, restart),  # one MLflow run for every allocation of a requeued job
        )
        parts = RunParts(
            cfg,
            output_dir,
            # ranks > 0 work in a scratch folder; only rank 0 writes outputs
            output_dir if rank == 0 else Path(tempfile.mkdtemp(prefix=f"asr-rank{rank}-")),
            rank,
            tracker,
            [*callbacks, interruption.callback],
        )
        _open(parts, role, restart)
        with threads.restored(), _closing(tracker, interruption):  # a pruned trial leaves no reduced thread count
            _prepare(parts, role)
            trainer, metrics = role.train(parts, resume)
            if role.tests:
                metrics = _test_and_record(parts, role, trainer, metrics)
        return metrics


def _open(parts: RunParts, role: roles.Plain, restart: bool) -> None:
    """The MLflow run's role tags, its restart count, and mlflow_run.json (lets `asr.evaluate run_dir=...`
    file its results next to this run, and a requeued job find it again)."""
    tracker = parts.tracker
    role.opened(tracker)
    if restart and tracker.reopened:
        tracker.set_tag("restarts", str(int(tracker.tag("restarts") or 0) + 1))
    if tracker.run_id:
        RunRecord(tracker.run_id, tracker.client.tracking_uri, requeue.job_id()).write(parts.output_dir)
        tracker.set_tag("output_dir", str(parts.output_dir.resolve()))


def _prepare(parts: RunParts, role: roles.Plain) -> None:
    """Data (loaded, normalised, featurised), model, and the audited data; recorded in the run."""
    cfg, tracker = parts.cfg, parts.tracker
    if not tracker.reopened:
        tracker.log_config(cfg)
    set_seed(cfg.seed)
    with _main_process_first():  # rank 0 speaks the corpus and fills the feature cache; the others read it
        splits, features, parts.processor = prepare(cfg, parts.work_dir)
    settings = {
        "normalization": NORMALIZATION_VERSION,
        "text": OmegaConf.to_container(cfg.dataset.text),
        "audit": OmegaConf.to_container(cfg.audit),
    }
    data_fingerprint = fingerprint(splits, settings)
    tracker.set_tag("dataset_fingerprint", data_fingerprint)
    tracker.set_tag("device", device_name())  # plan=true compares throughput on the same kind of device
    role.check_data(data_fingerprint)
    tracker.set_tag("split_sizes", " ".join(f"{name}={len(rows)}" for name, rows in splits.items()))
    parts.model = build_model(cfg.model, cfg.regularization, parts.processor.tokenizer, cfg.trainer.attn_implementation)
    parts.features, audit = run_audit(
        features,
        cfg.audit,
        parts.model.config,
        parts.work_dir / "data_audit.json",
        allow_missing=cfg.dataset.get("allow_missing_audio", False),
    )
    if not tracker.reopened:
        quarantined = {f"audit_{k}": v for k, v in audit["by_reason"].items()}
        tracker.log_metrics({"audit_quarantined": audit["quarantined"], **quarantined}, step=0)
        tracker.log_artifact(parts.output_dir / "data_audit.json")
    if role.tests:  # what its test step needs is checked before training, not after hours of it
        check_lm_before_training(cfg, parts.features)
        averaging.check_settings(cfg.trainer)
        parts.callbacks.extend(averaging.callbacks(cfg.trainer))


def _test_and_record(parts: RunParts, role: roles.Plain, trainer, metrics: dict) -> dict:
    """Save the tested model, test it (and the checkpoint average, if asked), write metrics.json and the
    predictions, decode with an LM if asked."""
    cfg, output_dir, features, processor = parts.cfg, parts.output_dir, parts.features, parts.processor
    trainer.save_model(str(output_dir / "model"))  # the best checkpoint, restored by load_best_model_at_end
    test = trainer.predict(features["test"], metric_key_prefix="test")  # every rank takes part, and gets every row
    references, hypotheses = decode_predictions(processor.tokenizer, test.predictions, test.label_ids)
    tested = {k: v for k, v in test.metrics.items() if k.startswith("test_") and "per_second" not in k}
    metrics = {**metrics, **tested}
    averaged = _test_average(parts, trainer) if cfg.trainer.average_checkpoints else None
    if parts.rank != 0:
        return metrics
    processor.save_pretrained(str(output_dir / "model"))
    ids, speakers = features["test"]["id"], features["test"]["speaker"]
    write_predictions(output_dir / "predictions_test.jsonl", ids, speakers, references, hypotheses)
    step = trainer.state.global_step
    files = ["metrics.json", "predictions_test.jsonl", "model/vocab.json"]
    if averaged:
        metrics.update(averaged)
        files.append("average/predictions_test.jsonl")
    _save_results(output_dir, metrics, parts.tracker, step, files)
    if cfg.lm.after_training:  # greedy and n-gram LM test WER side by side (asr/lm/after_training.py)
        metrics.update(_lm_step(parts, trainer, step, metrics))
    role.finished(parts, metrics)
    log.info(
        "eval WER %.4f (best, step %s) | test WER %.4f, CER %.4f | %s",
        metrics.get("eval_wer", float("nan")),
        metrics.get("best_step"),
        metrics["test_wer"],
        metrics["test_cer"],
        output_dir,
    )
    return metrics


def _test_average(parts: RunParts, trainer) -> dict:
    """trainer.average_checkpoints: the weight average of N of this run's checkpoints, evaluated on dev and
    tested (eval_avg_*, test_avg_* beside the run's own eval_* and test_*), saved in average/ (model/ and
    predictions_test.jsonl, so `asr.evaluate 'compare=[<run>,<run>/average]'` pairs the two); the run's own
    model is restored afterwards (the LM step decodes with it)."""
    settings, output_dir, features, processor = parts.cfg.trainer, parts.output_dir, parts.features, parts.processor
    chosen = averaging.choose(
        Path(trainer.args.output_dir),
        settings.average_checkpoints,
        settings.average_checkpoints_by,
        trainer.state.log_history,
        decay_from=fork_step(trainer.state.max_steps, settings.cooldown_fraction),
    )
    if len(chosen) < settings.average_checkpoints:
        log.warning(
            "trainer.average_checkpoints=%d: only %d checkpoint(s) saved; no average tested",
            settings.average_checkpoints,
            len(chosen),
        )
        return {}
    started = time.perf_counter()
    model = trainer.accelerator.unwrap_model(trainer.model)
    own = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    model.load_state_dict(averaging.average_weights(chosen))
    steps = " ".join(str(checkpoint_step(c)) for c in chosen)
    log.info("Testing the average of %d checkpoints (steps %s)", len(chosen), steps)
    dev = trainer.evaluate(metric_key_prefix="eval_avg")
    test = trainer.predict(features["test"], metric_key_prefix="test_avg")
    result = {k: v for k, v in {**dev, **test.metrics}.items() if k.endswith(("_wer", "_cer", "_loss"))}
    result["average_seconds"] = time.perf_counter() - started  # loading, averaging and both evaluations
    if parts.rank == 0:
        trainer.save_model(str(output_dir / "average" / "model"))
        processor.save_pretrained(str(output_dir / "average" / "model"))
        references, hypotheses = decode_predictions(processor.tokenizer, test.predictions, test.label_ids)
        ids, speakers = features["test"]["id"], features["test"]["speaker"]
        write_predictions(output_dir / "average" / "predictions_test.jsonl", ids, speakers, references, hypotheses)
        parts.tracker.set_tag("averaged_checkpoints", steps)
    model.load_state_dict(own)
    return result


def _lm_step(parts: RunParts, trainer, step: int, metrics: dict) -> dict:
    """The LM step after training; a failure is logged and tagged, and the run's model and metrics are kept."""
    from asr.lm.after_training import decode_test_with_lm

    cfg, output_dir, tracker = parts.cfg, parts.output_dir, parts.tracker
    try:
        lm_metrics = decode_test_with_lm(cfg, output_dir, trainer.model, parts.features, parts.processor)
    except Exception as err:  # noqa: BLE001  (the trained model and its metrics are kept whatever the LM does)
        log.error("LM decoding failed (%s: %s); the run's model and metrics are kept", type(err).__name__, err)
        tracker.set_tag("lm_error", f"{type(err).__name__}: {err}"[:5000])
        return {}
    files = ("metrics.json", "predictions_test_lm.jsonl", "model/lm/lm.json")
    _save_results(output_dir, {**metrics, **lm_metrics}, tracker, step, files, logged=lm_metrics)
    return lm_metrics


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


@contextmanager
def _closing(tracker: MlflowRun, interruption: requeue.Interruption) -> Iterator[None]:
    """The MLflow run's end, however the block ends: FINISHED (also when pruned, tagged `trial_state=PRUNED`),
    SCHEDULED when SLURM requeues the job (the next allocation reopens it), KILLED on Ctrl-C or SIGTERM,
    FAILED with the error as a tag."""
    try:
        yield
    except RunPruned:
        tracker.set_tag("trial_state", "PRUNED")
        tracker.end("FINISHED")
        raise
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (scancel, the time limit), or a requeue
        if interruption.requeuing:
            tracker.set_tag("requeued", "true")
            tracker.end("SCHEDULED")
        else:
            tracker.end("KILLED")
        raise
    except Exception as err:
        tracker.set_tag("error", (str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}")[:5000])
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


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
