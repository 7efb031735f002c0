"""Greedy CTC inference on prepared features: length-sorted batches, padding never decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import Trainer, Wav2Vec2BertForCTC, Wav2Vec2BertProcessor

from asr.collator import CTCCollator


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
    """The HF Trainer, with padded frames blanked before evaluation metrics see the logits."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is not None:
            logits = blank_padded_frames(logits, inputs.get("attention_mask"), self.accelerator.unwrap_model(model))
        return loss, logits, labels


def load_model(model_dir: str | Path, device: str | None = None) -> tuple[Wav2Vec2BertForCTC, Wav2Vec2BertProcessor]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Wav2Vec2BertForCTC.from_pretrained(str(model_dir)).to(device).eval()
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
