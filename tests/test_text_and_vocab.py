"""Transcript normalisation and the train-only vocabulary."""

from __future__ import annotations

import pytest

from asr.data.text import normalize_text
from asr.features import build_processor, build_vocab
from asr.model import load_feature_extractor
from conftest import compose_cfg


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("नमस्ते, साथी।", "नमस्ते साथी"),  # comma and danda removed
        ("पहिलो॥ दोस्रो", "पहिलो दोस्रो"),  # double danda
        ("  धेरै   ठाउँ\tमा  ", "धेरै ठाउँ मा"),  # whitespace collapsed and trimmed
        ("क्\u200dष", "क्ष"),  # zero-width joiner removed
        ("नेपाल\u00a0देश", "नेपाल देश"),  # no-break space becomes a space
        ("Hello World!", "hello world"),  # Latin lower-cased, punctuation dropped
        ("\u0958", "\u0915\u093c"),  # NFC: precomposed QA and KA + NUKTA become one spelling
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_keeps_vowel_signs_and_virama():
    text = "कि की कु कू के कै को कौ कं कः क्"
    assert normalize_text(text) == text


def test_normalize_options_can_be_switched_off():
    assert normalize_text("Hello, World।", lowercase=False, remove_punctuation=False) == "Hello, World।"


def test_vocab_comes_from_train_only(tmp_path):
    vocab = build_vocab(["क ख", "ख ग"])
    assert set(vocab) == {"क", "ख", "ग", "|", "[UNK]", "[PAD]"}
    processor = build_processor(vocab, load_feature_extractor(compose_cfg().model), tmp_path)
    tokenizer = processor.tokenizer
    ids = tokenizer("क घ").input_ids  # घ appears only in dev/test
    assert ids == [vocab["क"], vocab["|"], vocab["[UNK]"]]
    assert tokenizer.decode([vocab["क"], vocab["|"], vocab["ग"]]) == "क ग"
    assert (tmp_path / "vocab.json").is_file()
