"""The Trainer of a run: TrainingArguments from our short config names, our batching, collator,
metrics and callbacks (`build_trainer`). The process-wide torch settings of a trainer preset are
in asr.torch_setup.

`CTCTrainer` is the HF Trainer with batches sized by audio seconds (asr.batching), evaluation
batches sorted by length, and padded frames forced to the CTC blank before metrics see them.
One concern over ~300 lines: the Trainer subclass overrides the sampler, the data loaders and the
prediction loop together, and they only make sense side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import BatchSampler, DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments, Wav2Vec2BertProcessor, get_wsd_schedule
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PredictionOutput, seed_worker

from asr.batching import DurationBatchSampler, PadPolicy
from asr.branches import decay_steps
from asr.collator import STATS_KEY, CTCCollator
from asr.errors import ConfigError
from asr.inference import blank_padded_frames
from asr.metrics import argmax_logits, make_compute_metrics
from asr.throughput import BatchStats, ThroughputCallback
from asr.torch_setup import ddp_on_cpu, resolve_precision, thread_callbacks
from asr.tracking import MlflowMetricsCallback, MlflowRun

log = logging.getLogger(__name__)

LENGTH_COLUMN = "input_length"  # feature frames per utterance, stored by asr.features
WSD_SHAPES = ("1-sqrt", "linear", "cosine")  # transformers' WSD decay types


def frames_per_second(processor: Wav2Vec2BertProcessor) -> float:
    """Feature frames per second of audio: 10 ms fbank frames, `stride` of them stacked (50/s for w2v-bert)."""
    return 100.0 / processor.feature_extractor.stride


def pad_policy(cfg: DictConfig, fps: float) -> PadPolicy:
    return PadPolicy.from_seconds(cfg.pad_to_multiple_of, cfg.bucket_edges_seconds, fps)


def build_training_args(cfg: DictConfig, output_dir: Path, layerdrop: float = 0.0) -> TrainingArguments:
    """Our short, sweepable names (trainer.lr, trainer.epochs...) → TrainingArguments."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio  # a float < 1 is a ratio
    return TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.lr,
        lr_scheduler_type="warmup_stable_decay" if cfg.lr_scheduler == "wsd" else cfg.lr_scheduler,
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
        dataloader_pin_memory=torch.cuda.is_available() and cfg.pin_memory,
        dataloader_persistent_workers=cfg.dataloader_num_workers > 0,  # no worker restart at every epoch and evaluation
        optim=cfg.optim,
        # layerdrop skips different layers on different ranks: DDP must allow unused parameters
        ddp_find_unused_parameters=True if layerdrop > 0 else None,
        seed=cfg.seed,
        use_cpu=ddp_on_cpu(),
        report_to="none",  # MLflow is handled by asr.tracking (see there why)
        **resolve_precision(cfg.precision),
        **OmegaConf.to_container(cfg.extra, resolve=True),
    )


def wsd_settings(cfg: DictConfig) -> dict | None:
    """trainer.lr_scheduler=wsd: the cooldown's share and shape (None for the Trainer's own schedules)."""
    if cfg.lr_scheduler != "wsd":
        return None
    shape, fraction = cfg.cooldown_shape, cfg.cooldown_fraction
    if shape not in WSD_SHAPES:
        raise ConfigError(f"trainer.cooldown_shape={shape!r} is not a decay shape. Fix: one of {', '.join(WSD_SHAPES)}")
    decay_steps(1, fraction)  # checks the fraction
    return {"cooldown_fraction": fraction, "shape": shape, "hold": False}


def build_trainer(
    cfg: DictConfig,
    output_dir: Path,
    model,
    features: DatasetDict,
    processor,
    tracker: MlflowRun | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[CTCTrainer, ThroughputCallback]:
    """The Trainer of a run: our batching, collator, metrics and callbacks (benchmarks build theirs here too)."""
    fps = frames_per_second(processor)
    pad = pad_policy(cfg.trainer, fps)
    stats = BatchStats()
    throughput = ThroughputCallback(stats, tracker, fps, cfg.trainer.peak_tflops)
    trainer = CTCTrainer(
        model=model,
        args=build_training_args(cfg.trainer, output_dir, model.config.layerdrop),
        data_collator=CTCCollator(processor, pad, with_stats=True),
        train_dataset=features["train"],
        eval_dataset=features["dev"],
        processing_class=processor,
        compute_metrics=make_compute_metrics(processor.tokenizer),
        preprocess_logits_for_metrics=argmax_logits,
        callbacks=[
            *([MlflowMetricsCallback(tracker)] if tracker else []),
            throughput,
            *thread_callbacks(cfg.trainer),
            *callbacks,
        ],
        batch_seconds=cfg.trainer.batch_seconds,
        wsd=wsd_settings(cfg.trainer),
        pad=pad,
        frames_per_second=fps,
        batch_stats=stats,
    )
    return trainer, throughput


class CTCTrainer(Trainer):
    """The HF Trainer with our batching, and padded frames blanked before evaluation metrics see the logits.

    - `batch_seconds` set: training batches come from `DurationBatchSampler` (at most that many
      padded seconds each, similar lengths, shuffled per epoch); `None` keeps the Trainer's own
      sampler and `per_device_train_batch_size`. The sampler is rank-aware, so accelerate's
      batch sharding is made a pass-through, as the Trainer does for its own rank-aware sampler.
    - Evaluation and prediction batches are sorted by length (fewest padded frames); `predict`
      returns its rows in the dataset's order again.
    - `batch_stats` receives the collator's per-batch numbers (asr.throughput).
    """

    def __init__(
        self,
        *args,
        batch_seconds: float | None = None,
        wsd: dict | None = None,
        pad: PadPolicy = PadPolicy(),
        frames_per_second: float = 50.0,
        batch_stats: BatchStats | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.wsd = wsd
        self.batch_seconds, self.pad, self.frames_per_second, self.batch_stats = (
            batch_seconds,
            pad,
            frames_per_second,
            batch_stats,
        )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """trainer.lr_scheduler=wsd: warm-up, constant, then a decay to 0 over the last cooldown_fraction
        of the steps (transformers' WSD schedule); `hold` (a shared trunk) never decays."""
        if self.wsd is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        decay = 0 if self.wsd["hold"] else decay_steps(num_training_steps, self.wsd["cooldown_fraction"])
        self.lr_scheduler = get_wsd_schedule(
            optimizer or self.optimizer,
            num_warmup_steps=warmup,
            num_decay_steps=decay,
            num_stable_steps=max(0, num_training_steps - warmup - decay) if not self.wsd["hold"] else 2**62,
            decay_type=self.wsd["shape"],
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the train split (as the Trainer counts them)."""
        batches = len(self.get_train_dataloader())
        accum = self.args.gradient_accumulation_steps
        return max(batches // accum + int(batches % accum > 0), 1)

    def _get_train_sampler(self, train_dataset=None):
        """trainer.group_by_length: transformers' length-grouped order, drawn from seed + epoch instead of
        torch's global RNG, so a run resumed mid-epoch (a requeued job, a branch at its fork) sees the
        batches the uninterrupted run saw (the global RNG is restored only after the order is drawn)."""
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler = EpochSeededLengthGroupedSampler.like(sampler, self.args.data_seed or self.args.seed)
        return sampler

    def train_batch_sampler(self, dataset: Dataset) -> DurationBatchSampler:
        return DurationBatchSampler(
            dataset[LENGTH_COLUMN],
            max_frames=int(self.batch_seconds * self.frames_per_second),
            pad=self.pad,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.batch_seconds is None or LENGTH_COLUMN not in self.train_dataset.column_names:
            return super().get_train_dataloader()
        sampler = self.train_batch_sampler(self.train_dataset)
        loader = self._batched_loader(self.train_dataset, sampler, "Training", is_training=True)
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0  # already one rank's share: do not re-shard
        return loader

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        key = eval_dataset if isinstance(eval_dataset, str) else "eval"
        cached = getattr(self, "_eval_dataloaders", {})
        if self.args.dataloader_persistent_workers and key in cached:  # keep the workers alive between evaluations
            return cached[key]
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        loader = self._sorted_eval_loader(self.eval_dataset if dataset is None else dataset, "Evaluation")
        if loader is None:
            return super().get_eval_dataloader(eval_dataset)
        if self.args.dataloader_persistent_workers:
            self._eval_dataloaders = {**cached, key: loader}
        return loader

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        return self._sorted_eval_loader(test_dataset, "test") or super().get_test_dataloader(test_dataset)

    def predict(self, test_dataset: Dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        output = super().predict(test_dataset, ignore_keys, metric_key_prefix)
        order = _eval_order(test_dataset)
        if order is None:
            return output
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        restore = lambda array: array[inverse] if isinstance(array, np.ndarray) else array  # noqa: E731
        return PredictionOutput(
            predictions=restore(output.predictions), label_ids=restore(output.label_ids), metrics=output.metrics
        )

    def _sorted_eval_loader(self, dataset, description: str) -> DataLoader | None:
        order = _eval_order(dataset)
        if order is None:
            return None
        # a plain BatchSampler (fixed size, with `batch_size`): accelerate shards it over ranks, and
        # gather_for_metrics then returns the rows in this order on every world size
        return self._batched_loader(
            dataset, BatchSampler(order.tolist(), self.args.eval_batch_size, drop_last=False), description
        )

    def _batched_loader(
        self, dataset: Dataset, batch_sampler, description: str, is_training: bool = False
    ) -> DataLoader:
        """What Trainer._get_dataloader builds, with a batch sampler in place of batch_size + sampler."""
        dataset = self._remove_unused_columns(dataset, description=description)
        params = {
            "batch_sampler": batch_sampler,
            "collate_fn": self.data_collator,
            "num_workers": self.args.dataloader_num_workers,
            "pin_memory": self.args.dataloader_pin_memory,
            "persistent_workers": self.args.dataloader_persistent_workers,
            "multiprocessing_context": self.args.dataloader_multiprocessing_context,
            "prefetch_factor": self.args.dataloader_prefetch_factor,
            "in_order": self.args.dataloader_in_order,
        }
        if is_training:
            params["worker_init_fn"] = partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            )
        return self.accelerator.prepare(DataLoader(dataset, **params))

    def training_step(self, model, inputs, num_items_in_batch=None):
        stats = inputs.pop(STATS_KEY, None)
        if stats is not None and self.batch_stats is not None:
            self.batch_stats.add(stats)
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(STATS_KEY, None)
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is not None:
            logits = blank_padded_frames(logits, inputs.get("attention_mask"), self.accelerator.unwrap_model(model))
        return loss, logits, labels


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """LengthGroupedSampler whose order depends on (seed, epoch) only (the Trainer calls `set_epoch`)."""

    @classmethod
    def like(cls, sampler: LengthGroupedSampler, seed: int) -> EpochSeededLengthGroupedSampler:
        seeded = cls.__new__(cls)
        seeded.__dict__.update(sampler.__dict__)
        seeded.seed = seed
        seeded.set_epoch(0)
        return seeded

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)


def _eval_order(dataset) -> np.ndarray | None:
    """Longest utterances first (stable): the evaluation batch order, or None without a length column."""
    if not isinstance(dataset, Dataset) or LENGTH_COLUMN not in dataset.column_names:
        return None
    return np.argsort(-np.asarray(dataset[LENGTH_COLUMN]), kind="stable")
