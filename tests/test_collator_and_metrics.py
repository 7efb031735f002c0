"""Batch padding and the WER/CER numbers, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from asr.collator import CTCCollator
from asr.features import build_processor, build_vocab
from asr.metrics import argmax_logits, decode_predictions, error_rates
from asr.model import load_feature_extractor

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`


@pytest.fixture()
def processor(tmp_path):
    return build_processor(build_vocab(["क ख ग"]), load_feature_extractor(compose_cfg().model), tmp_path)


def test_collator_pads_features_and_masks_labels(processor):
    rows = [
        {"input_features": np.ones((7, 160), np.float32), "labels": [0, 1, 2]},
        {"input_features": np.full((4, 160), 2.0, np.float32), "labels": [2]},
    ]
    batch = CTCCollator(processor)(rows)
    assert batch["input_features"].shape == (2, 7, 160)
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert torch.equal(batch["input_features"][1, :4], torch.full((4, 160), 2.0))
    assert batch["labels"].tolist() == [[0, 1, 2], [2, -100, -100]]


def test_error_rates_hand_computed():
    refs = ["नमस्ते साथी", "म घर जान्छु"]
    hyps = ["नमस्ते साथि", "म घर"]
    rates = error_rates(refs, hyps)
    # words: 5 in the references; 1 substitution (साथी→साथि) + 1 deletion (जान्छु) = 2 errors
    assert rates["wer"] == pytest.approx(2 / 5)
    assert (rates["substitutions"], rates["deletions"], rates["insertions"]) == (1, 1, 0)
    # characters: 11 + 11 = 22; 1 substitution (ी→ि) + 7 deletions (" जान्छु") = 8 errors
    assert rates["cer"] == pytest.approx(8 / 22)


def test_error_rates_perfect_and_empty_hypothesis():
    assert error_rates(["क ख"], ["क ख"])["wer"] == 0.0
    assert error_rates(["क ख"], [""])["wer"] == 1.0


def test_ctc_decoding_collapses_repeats_and_blanks(processor):
    vocab = processor.tokenizer.get_vocab()
    k, kh, sep, blank = vocab["क"], vocab["ख"], vocab["|"], vocab["[PAD]"]
    preds = np.array([[k, k, blank, k, sep, kh, kh, -100]])  # -100: Trainer's cross-batch padding
    labels = np.array([[k, k, sep, kh, -100, -100, -100, -100]])
    refs, hyps = decode_predictions(processor.tokenizer, preds, labels)
    assert hyps == ["कक ख"]  # a blank separates the two क; repeats without one merge
    assert refs == ["कक ख"]  # labels are not collapsed


def test_argmax_logits_keeps_ids_only():
    logits = torch.tensor([[[0.1, 3.0, 0.2], [2.0, 0.0, 0.1]]])
    assert argmax_logits(logits, None).tolist() == [[1, 0]]
