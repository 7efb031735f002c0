"""Greedy CTC inference on prepared features: length-sorted batches, padding never decoded."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm
from transformers import Trainer, Wav2Vec2BertForCTC, Wav2Vec2BertProcessor
from transformers.trainer_utils import PredictionOutput, seed_worker

from asr.batching import DurationBatchSampler, PadPolicy
from asr.collator import STATS_KEY, CTCCollator
from asr.model import mask_adapter_padding
from asr.throughput import BatchStats

LENGTH_COLUMN = "input_length"  # feature frames per utterance, stored by asr.features


def blank_padded_frames(logits: torch.Tensor, attention_mask: torch.Tensor | None, model: Wav2Vec2BertForCTC) -> torch.Tensor:
    """Make every frame past an utterance's end predict the CTC blank.

    Padded frames still get logits (their queries attend to the real frames), and their argmax is
    often a letter: decoded as is, a transcript would depend on how long the *other* utterances
    in its batch were. Blanked, the result is the same for any batch size or order.
    """
    if attention_mask is None:
        return logits
    lengths = model._get_feat_extract_output_lengths(attention_mask.sum(-1)).to(logits.device)
    padded = torch.arange(logits.shape[1], device=logits.device)[None, :] >= lengths[:, None]
    blank = torch.full_like(logits[0, 0], torch.finfo(logits.dtype).min)
    blank[model.config.pad_token_id] = 0
    return torch.where(padded[..., None], blank, logits)


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

    def __init__(self, *args, batch_seconds: float | None = None, pad: PadPolicy = PadPolicy(),
                 frames_per_second: float = 50.0, batch_stats: BatchStats | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_seconds, self.pad, self.frames_per_second, self.batch_stats = batch_seconds, pad, frames_per_second, batch_stats

    def train_batch_sampler(self, dataset: Dataset) -> DurationBatchSampler:
        return DurationBatchSampler(
            dataset[LENGTH_COLUMN], max_frames=int(self.batch_seconds * self.frames_per_second), pad=self.pad,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            num_replicas=self.args.world_size, rank=self.args.process_index,
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
        return PredictionOutput(predictions=restore(output.predictions), label_ids=restore(output.label_ids), metrics=output.metrics)

    def _sorted_eval_loader(self, dataset, description: str) -> DataLoader | None:
        order = _eval_order(dataset)
        if order is None:
            return None
        # a plain BatchSampler (fixed size, with `batch_size`): accelerate shards it over ranks, and
        # gather_for_metrics then returns the rows in this order on every world size
        return self._batched_loader(dataset, BatchSampler(order.tolist(), self.args.eval_batch_size, drop_last=False), description)

    def _batched_loader(self, dataset: Dataset, batch_sampler, description: str, is_training: bool = False) -> DataLoader:
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
            params["worker_init_fn"] = partial(seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index)
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


def _eval_order(dataset) -> np.ndarray | None:
    """Longest utterances first (stable): the evaluation batch order, or None without a length column."""
    if not isinstance(dataset, Dataset) or LENGTH_COLUMN not in dataset.column_names:
        return None
    return np.argsort(-np.asarray(dataset[LENGTH_COLUMN]), kind="stable")


def load_model(model_dir: str | Path, device: str | None = None) -> tuple[Wav2Vec2BertForCTC, Wav2Vec2BertProcessor]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Wav2Vec2BertForCTC.from_pretrained(str(model_dir)).to(device).eval()
    mask_adapter_padding(model)  # transcripts independent of the padding in a batch (asr/model.py)
    return model, Wav2Vec2BertProcessor.from_pretrained(str(model_dir))


@torch.inference_mode()
def transcribe_features(model: Wav2Vec2BertForCTC, processor: Wav2Vec2BertProcessor, features: Dataset,
                        batch_size: int, desc: str = "Transcribing") -> list[str]:
    """Transcripts in the dataset's order; batches are formed longest-first to keep padding small."""
    order = np.argsort(-np.asarray(features["input_length"]), kind="stable")
    collate = CTCCollator(processor)
    texts: list[str] = [""] * len(order)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        rows = [features[int(i)] for i in order[start : start + batch_size]]
        batch = collate([{"input_features": row["input_features"]} for row in rows])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = blank_padded_frames(model(**batch).logits, batch["attention_mask"], model)
        for i, text in zip(order[start : start + batch_size], processor.tokenizer.batch_decode(logits.argmax(-1).cpu().numpy())):
            texts[int(i)] = text
    return texts
