"""Batches for CTC: features padded per batch (with attention mask), labels (if any) padded with -100."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Wav2Vec2BertProcessor


@dataclass
class CTCCollator:
    """Pads to the longest utterance of the batch; -100 labels are ignored by the CTC loss."""

    processor: Wav2Vec2BertProcessor

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor.feature_extractor.pad(
            [{"input_features": row["input_features"]} for row in rows], padding=True, return_tensors="pt"
        )
        if "labels" in rows[0]:  # absent at inference
            labels = self.processor.tokenizer.pad([{"input_ids": row["labels"]} for row in rows], padding=True, return_tensors="pt")
            batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)
        return batch
