"""WER and CER with jiwer (offline; `evaluate.load("wer")` needs the Hub)."""

from __future__ import annotations

from collections.abc import Callable

import jiwer
import numpy as np
import torch
from transformers import EvalPrediction, Wav2Vec2CTCTokenizer


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level WER/CER (errors over reference words/characters) plus the word S/D/I counts."""
    words = jiwer.process_words(references, hypotheses)
    return {
        "wer": words.wer,
        "cer": jiwer.cer(references, hypotheses),
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
    }


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep token ids, so eval never accumulates full logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def decode_predictions(
    tokenizer: Wav2Vec2CTCTokenizer, pred_ids: np.ndarray, label_ids: np.ndarray
) -> tuple[list[str], list[str]]:
    """Greedy CTC decoding of predictions; labels decoded without collapsing repeated characters."""
    pred_ids = np.where(pred_ids == -100, tokenizer.pad_token_id, pred_ids)  # Trainer pads across batches with -100
    label_ids = np.where(label_ids == -100, tokenizer.pad_token_id, label_ids)
    hypotheses = tokenizer.batch_decode(pred_ids)
    references = tokenizer.batch_decode(label_ids, group_tokens=False)
    return references, hypotheses


def make_compute_metrics(tokenizer: Wav2Vec2CTCTokenizer) -> Callable[[EvalPrediction], dict[str, float]]:
    def compute_metrics(pred: EvalPrediction) -> dict[str, float]:
        return error_rates(*decode_predictions(tokenizer, pred.predictions, pred.label_ids))

    return compute_metrics
