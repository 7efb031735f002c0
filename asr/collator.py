"""Batches for CTC: features padded per batch (with attention mask), labels (if any) padded with -100."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Wav2Vec2BertProcessor

from asr.batching import PadPolicy

STATS_KEY = "batch_stats"  # host-side numbers about the batch; CTCTrainer removes them before the forward pass


@dataclass
class CTCCollator:
    """Pads to the longest utterance of the batch, rounded up by `pad` to one of a few bucket lengths.

    The attention mask marks only real frames, so extra padding changes no result (the loss and
    the SpecAugment masks use the mask; decoding blanks padded frames). With `with_stats`, the
    batch carries `batch_stats` (real/padded frames, shape) for the throughput metrics: computed
    here on the host, so measuring never waits on the GPU.
    """

    processor: Wav2Vec2BertProcessor
    pad: PadPolicy = field(default_factory=PadPolicy)
    with_stats: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(row["input_features"]) for row in rows]
        target = self.pad.padded(max(lengths))
        batch = self.processor.feature_extractor.pad(
            [{"input_features": row["input_features"]} for row in rows],
            padding="max_length",
            max_length=target,
            return_attention_mask=True,
            return_tensors="pt",
        )
        if "labels" in rows[0]:  # absent at inference
            labels = self.processor.tokenizer.pad(
                [{"input_ids": row["labels"]} for row in rows], padding=True, return_tensors="pt"
            )
            batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)
        if self.with_stats:
            batch[STATS_KEY] = {
                "real_frames": sum(lengths),
                "padded_frames": len(rows) * target,
                "shape": (len(rows), target),
            }
        return batch
