"""Transcript normalisation and the train-only vocabulary."""

from __future__ import annotations

import pytest
from conftest import compose_cfg

from asr.data.text import normalize_text, number_to_words
from asr.features import build_processor, build_vocab
from asr.model import load_feature_extractor

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`


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
    assert normalize_text(raw) == (expected, "")


def test_normalize_keeps_vowel_signs_and_virama():
    text = "कि की कु कू के कै को कौ कं कः क्"
    assert normalize_text(text) == (text, "")


def test_normalize_options_can_be_switched_off():
    assert normalize_text("Hello, World।", lowercase=False, remove_punctuation=False) == ("Hello, World।", "")


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (0, "शून्य"),
        (5, "पाँच"),
        (11, "एघार"),
        (21, "एक्काइस"),
        (99, "उनान्सय"),
        (100, "एक सय"),
        (105, "एक सय पाँच"),
        (2081, "दुई हजार एकासी"),
        (150000, "एक लाख पचास हजार"),
        (12345678, "एक करोड तेइस लाख पैँतालीस हजार छ सय अठहत्तर"),
    ],
)
def test_number_words(number, words):
    assert number_to_words(number) == words


def test_digit_policies():
    assert normalize_text("२०८१ सालमा ३ जना", digits="keep") == ("२०८१ सालमा ३ जना", "")
    assert normalize_text("२०८१ सालमा 3 जना", digits="words") == ("दुई हजार एकासी सालमा तीन जना", "")
    assert normalize_text("१,२०० रुपैयाँ र ३.५ किलो", digits="words") == ("एक हजार दुई सय रुपैयाँ र तीन दशमलव पाँच किलो", "")
    assert normalize_text("कोठा नं. ५", digits="drop_utterance") == ("", "digits")


def test_latin_policy():
    assert normalize_text("मेरो laptop बिग्रियो", latin="drop_utterance") == ("", "latin letters")
    assert normalize_text("मेरो Laptop बिग्रियो", latin="keep") == ("मेरो laptop बिग्रियो", "")


def test_rare_characters_become_unknown(tmp_path):
    vocab = build_vocab(["क ख", "क ख", "क ग"], min_char_count=2)  # ग seen once
    assert "ग" not in vocab and {"क", "ख", "[UNK]"} <= set(vocab)
    tokenizer = build_processor(vocab, load_feature_extractor(compose_cfg().model), tmp_path).tokenizer
    assert tokenizer("क ग").input_ids == [vocab["क"], vocab["|"], vocab["[UNK]"]]


def test_vocab_comes_from_train_only(tmp_path):
    vocab = build_vocab(["क ख", "ख ग"])
    assert set(vocab) == {"क", "ख", "ग", "|", "[UNK]", "[PAD]"}
    processor = build_processor(vocab, load_feature_extractor(compose_cfg().model), tmp_path)
    tokenizer = processor.tokenizer
    ids = tokenizer("क घ").input_ids  # घ appears only in dev/test
    assert ids == [vocab["क"], vocab["|"], vocab["[UNK]"]]
    assert tokenizer.decode([vocab["क"], vocab["|"], vocab["ग"]]) == "क ग"
    assert (tmp_path / "vocab.json").is_file()
