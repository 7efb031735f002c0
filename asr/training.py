"""The pipeline, top to bottom: load → normalise → vocab → features → model → train → test → save."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig, OmegaConf
from optuna import TrialPruned
from transformers import TrainerCallback, TrainingArguments, Wav2Vec2BertProcessor, set_seed

from asr.audit import run_audit
from asr.batching import PadPolicy
from asr.collator import CTCCollator
from asr.data import fingerprint, load_splits
from asr.data.text import NORMALIZATION_VERSION
from asr.features import build_processor, build_vocab, extract_features, normalize_splits
from asr.inference import CTCTrainer
from asr.metrics import argmax_logits, decode_predictions, make_compute_metrics
from asr.model import build_model, load_feature_extractor
from asr.throughput import BatchStats, ThroughputCallback
from asr.tracking import MlflowMetricsCallback, MlflowRun

log = logging.getLogger(__name__)


def resolve_precision(precision: str) -> dict[str, bool]:
    """auto = bf16 where the GPU supports it, else fp16 on CUDA, fp32 on CPU."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision in ("fp16", "bf16") and not cuda:
        log.warning("trainer.precision=%s needs a CUDA GPU; training in fp32 on this machine", precision)
        precision = "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"trainer.precision={precision!r}: choose auto, fp32, fp16 or bf16")
    return {"fp16": precision == "fp16", "bf16": precision == "bf16"}


def _on_cuda(setting: bool, name: str) -> bool:
    if setting and not torch.cuda.is_available():
        log.info("trainer.%s applies to CUDA GPUs only; ignored on this machine", name)
    return bool(setting) and torch.cuda.is_available()


def configure_torch(cfg: DictConfig) -> None:
    """Process-wide GPU settings of the trainer preset (no-ops on CPU); see conf/trainer/gpu_fast.yaml."""
    if cfg.get("cuda_alloc_conf"):
        # read by the CUDA caching allocator when it starts: set before anything touches the GPU
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", cfg.cuda_alloc_conf)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.memory._set_allocator_settings(cfg.cuda_alloc_conf)
    if _on_cuda(cfg.get("tf32", False), "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    benchmark = cfg.get("cudnn_benchmark", False)
    if benchmark == "auto":  # autotuning pays off only when the same few shapes come back
        benchmark = bool(cfg.get("bucket_edges_seconds")) or (cfg.get("pad_to_multiple_of") or 1) > 1
    if _on_cuda(benchmark, "cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True


def frames_per_second(processor: Wav2Vec2BertProcessor) -> float:
    """Feature frames per second of audio: 10 ms fbank frames, `stride` of them stacked (50/s for w2v-bert)."""
    return 100.0 / processor.feature_extractor.stride


def pad_policy(cfg: DictConfig, fps: float) -> PadPolicy:
    return PadPolicy.from_seconds(cfg.get("pad_to_multiple_of"), cfg.get("bucket_edges_seconds"), fps)


def build_training_args(cfg: DictConfig, output_dir: Path, layerdrop: float = 0.0) -> TrainingArguments:
    """Our short, sweepable names (trainer.lr, trainer.epochs...) → TrainingArguments."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio  # a float < 1 is a ratio
    return TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="input_length",
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        load_best_model_at_end=True,
        metric_for_best_model="wer",
        greater_is_better=False,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available() and cfg.get("pin_memory", True),
        dataloader_persistent_workers=cfg.dataloader_num_workers > 0,  # no worker restart at every epoch and evaluation
        optim=cfg.get("optim", "adamw_torch"),
        # layerdrop skips different layers on different ranks: DDP must allow unused parameters
        ddp_find_unused_parameters=True if layerdrop > 0 else None,
        seed=cfg.seed,
        use_cpu=_ddp_on_cpu(),
        report_to="none",  # MLflow is handled by asr.tracking (see there why)
        **resolve_precision(cfg.precision),
        **OmegaConf.to_container(cfg.extra, resolve=True),
    )


def best_eval(log_history: list[dict]) -> dict[str, float]:
    """The evaluation with the lowest WER (the checkpoint load_best_model_at_end restored)."""
    evals = [entry for entry in log_history if "eval_wer" in entry]
    if not evals:
        return {}
    best = min(evals, key=lambda entry: (entry["eval_wer"], entry["step"]))
    return {"eval_wer": best["eval_wer"], "eval_cer": best["eval_cer"], "eval_loss": best["eval_loss"], "best_step": best["step"]}


def write_predictions(path: Path, split: Dataset, references: list[str], hypotheses: list[str]) -> None:
    """One JSON line per utterance: what `asr.evaluate compare=...` pairs up by id."""
    with path.open("w", encoding="utf-8") as out:
        for utt_id, speaker, ref, hyp in zip(split["id"], split["speaker"], references, hypotheses):
            out.write(json.dumps({"id": utt_id, "speaker": speaker, "reference": ref, "hypothesis": hyp}, ensure_ascii=False) + "\n")


def prepare(cfg: DictConfig, output_dir: Path) -> tuple[DatasetDict, DatasetDict, Wav2Vec2BertProcessor]:
    """Rows → normalised text → train-only vocab → processor (saved to model/) → cached features."""
    splits = normalize_splits(load_splits(cfg.dataset), cfg.dataset.text)
    vocab = build_vocab(splits["train"]["text"], cfg.dataset.text.min_char_count)
    processor = build_processor(vocab, load_feature_extractor(cfg.model), output_dir / "model")
    features = extract_features(splits, processor, cfg.dataset, Path(cfg.paths.cache_dir) / "features")
    return splits, features, processor


def _ddp_on_cpu() -> bool:
    """torchrun on a machine without CUDA: accelerate needs cpu=True to use gloo (else each rank trains alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _shared_output_dir(output_dir: Path) -> tuple[Path, int]:
    """(rank 0's output folder, this process's rank): under torchrun every rank uses rank 0's folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return output_dir, 0
    from accelerate import PartialState  # sets up the process group (gloo on CPU, nccl on GPU)
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=_ddp_on_cpu())
    shared = broadcast_object_list([str(output_dir)], from_process=0)[0]
    return Path(shared), state.process_index


@contextmanager
def _main_process_first():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=_ddp_on_cpu()).main_process_first():
        yield


@contextmanager
def _sigterm_exits():
    """SIGTERM (SLURM's scancel, a time limit) ends the job via SystemExit: its run is closed KILLED."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(cfg: DictConfig, output_dir: str | Path, overrides: Sequence[str] = (),
        callbacks: Sequence[TrainerCallback] = (), resume_from_checkpoint: str | None = None) -> dict[str, float]:
    """Train and test one configuration; returns metrics.json's content (eval_wer is what sweeps minimise).

    The MLflow run opens first, so a job that fails on its data is recorded as FAILED too.
    `callbacks` join the Trainer's (a sweep's pruning callback); one raising `optuna.TrialPruned`
    stops the run, which is closed FINISHED with the tag `trial_state=PRUNED` and keeps its curves.
    """
    configure_torch(cfg.trainer)  # first: the CUDA allocator reads its settings once
    output_dir, rank = _shared_output_dir(Path(output_dir))
    # under torchrun only rank 0 records the run and writes outputs; the others work in a scratch folder
    work_dir = output_dir if rank == 0 else Path(tempfile.mkdtemp(prefix=f"asr-rank{rank}-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    run_name = cfg.tracking.run_name or (" ".join(overrides) or "defaults")
    tracking_cfg = cfg.tracking if rank == 0 else OmegaConf.create({"enabled": False})
    tracker = MlflowRun(tracking_cfg, run_name, {"dataset": cfg.dataset.name, "model": cfg.model.name, "overrides": " ".join(overrides)})
    if tracker.run_id:  # lets `asr.evaluate run_dir=...` file its results next to this run
        (output_dir / "mlflow_run.json").write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.client.tracking_uri}))
        tracker.set_tag("output_dir", str(output_dir.resolve()))
    with _sigterm_exits():
        try:
            tracker.log_config(cfg)
            set_seed(cfg.seed)
            with _main_process_first():  # rank 0 speaks the corpus and fills the feature cache; the others read it
                splits, features, processor = prepare(cfg, work_dir)
            settings = {"normalization": NORMALIZATION_VERSION, "text": OmegaConf.to_container(cfg.dataset.text),
                        "audit": OmegaConf.to_container(cfg.audit)}
            tracker.set_tag("dataset_fingerprint", fingerprint(splits, settings))
            tracker.set_tag("split_sizes", " ".join(f"{name}={len(rows)}" for name, rows in splits.items()))
            model = build_model(cfg.model, cfg.regularization, processor.tokenizer, cfg.trainer.get("attn_implementation"))
            features, audit = run_audit(features, cfg.audit, model.config, work_dir / "data_audit.json")
            tracker.log_metrics({"audit_quarantined": audit["quarantined"], **{f"audit_{k}": v for k, v in audit["by_reason"].items()}}, step=0)
            tracker.log_artifact(output_dir / "data_audit.json")
            metrics = _train_and_test(cfg, output_dir, model, features, processor, tracker, callbacks, resume_from_checkpoint, rank)
        except TrialPruned:
            tracker.set_tag("trial_state", "PRUNED")
            tracker.end("FINISHED")
            raise
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM from SLURM's scancel / a timeout
            tracker.end("KILLED")
            raise
        except Exception as err:
            tracker.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
            tracker.end("FAILED")
            raise
    tracker.end("FINISHED")
    return metrics


def build_trainer(cfg: DictConfig, output_dir: Path, model, features: DatasetDict, processor, tracker: MlflowRun | None = None,
                  callbacks: Sequence[TrainerCallback] = ()) -> tuple[CTCTrainer, ThroughputCallback]:
    """The Trainer of a run: our batching, collator, metrics and callbacks (benchmarks build theirs here too)."""
    fps = frames_per_second(processor)
    pad = pad_policy(cfg.trainer, fps)
    stats = BatchStats()
    throughput = ThroughputCallback(stats, tracker, fps, cfg.trainer.get("peak_tflops"))
    trainer = CTCTrainer(
        model=model,
        args=build_training_args(cfg.trainer, output_dir, model.config.layerdrop),
        data_collator=CTCCollator(processor, pad, with_stats=True),
        train_dataset=features["train"],
        eval_dataset=features["dev"],
        processing_class=processor,
        compute_metrics=make_compute_metrics(processor.tokenizer),
        preprocess_logits_for_metrics=argmax_logits,
        callbacks=[*([MlflowMetricsCallback(tracker)] if tracker else []), throughput, *callbacks],
        batch_seconds=cfg.trainer.get("batch_seconds"), pad=pad, frames_per_second=fps, batch_stats=stats,
    )
    return trainer, throughput


def _train_and_test(cfg, output_dir: Path, model, features: DatasetDict, processor, tracker: MlflowRun,
                    callbacks: Sequence[TrainerCallback] = (), resume_from_checkpoint: str | None = None,
                    rank: int = 0) -> dict[str, float]:
    trainer, throughput = build_trainer(cfg, output_dir, model, features, processor, tracker, callbacks)
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    train_runtime = time.perf_counter() - started
    trainer.save_model(str(output_dir / "model"))  # the best checkpoint, restored by load_best_model_at_end (rank 0 writes)
    test = trainer.predict(features["test"], metric_key_prefix="test")  # every rank takes part, and gets every row
    references, hypotheses = decode_predictions(processor.tokenizer, test.predictions, test.label_ids)

    metrics = {
        **best_eval(trainer.state.log_history),
        **{k: v for k, v in test.metrics.items() if k.startswith("test_") and "per_second" not in k},
        "train_loss": train_output.training_loss,
        "train_runtime": train_runtime,
        "train_steps": trainer.state.global_step,
        "train_epochs": trainer.state.epoch,
        "train_utterances": len(features["train"]),
        "train_audio_seconds": float(sum(features["train"]["duration"])),
        **throughput.summary,
    }
    if rank != 0:
        return metrics
    processor.save_pretrained(str(output_dir / "model"))
    write_predictions(output_dir / "predictions_test.jsonl", features["test"], references, hypotheses)
    if cfg.get("lm") and cfg.lm.after_training:  # greedy and n-gram LM test WER side by side (asr/lm/after_training.py)
        from asr.lm.after_training import decode_test_with_lm

        metrics.update(decode_test_with_lm(cfg, output_dir, trainer.model, features, processor))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("test_")}, step=trainer.state.global_step)
    tracker.log_metrics({f"best_{k}": v for k, v in metrics.items() if k in ("eval_cer", "eval_loss")}, step=trainer.state.global_step)
    for name in ("metrics.json", "predictions_test.jsonl", "model/vocab.json", "predictions_test_lm.jsonl", "model/lm/lm.json"):
        tracker.log_artifact(output_dir / name)
    log.info("eval WER %.4f (best, step %s) | test WER %.4f, CER %.4f | %s",
             metrics.get("eval_wer", float("nan")), metrics.get("best_step"), metrics["test_wer"], metrics["test_cer"], output_dir)
    return metrics
