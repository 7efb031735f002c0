"""Transcript normalisation: what the model is asked to spell, so it must match at train and test."""

from __future__ import annotations

import re
import unicodedata

# Invisible joiners that change bytes but not what is said; NBSP is turned into a space.
_INVISIBLE = dict.fromkeys(map(ord, "\u200c\u200d\ufeff\u00ad"), None)
_SPACES = re.compile(r"\s+")


def normalize_text(text: str, lowercase: bool = True, remove_punctuation: bool = True) -> str:
    """NFC, drop joiners, punctuation (danda `।`/`॥` included) and symbols, collapse spaces.

    Devanagari vowel signs and viramas are marks (categories Mn/Mc), not punctuation, so they stay.
    """
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE).replace("\u00a0", " ")
    if remove_punctuation:
        text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    if lowercase:
        text = text.lower()
    return _SPACES.sub(" ", text).strip()
