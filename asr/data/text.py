"""Transcript normalisation: what the model is asked to spell, so it must match at train and test.

Rules (each configurable under `dataset.text`): Unicode NFC; zero-width joiners, soft hyphens
and no-break spaces removed; punctuation and symbols (danda `।`/`॥` included) removed;
Devanagari and ASCII digits kept, spelled out in Nepali, or the utterance rejected; Latin
letters kept or the utterance rejected; whitespace collapsed. A rejected utterance is
quarantined by the audit (reason `text_rejected`), never silently altered.
"""

from __future__ import annotations

import re
import unicodedata

NORMALIZATION_VERSION = 2  # bump when a rule changes what it writes

_INVISIBLE = dict.fromkeys(map(ord, "\u200c\u200d\ufeff\u00ad"), None)
_SPACES = re.compile(r"\s+")
_DIGITS = "०१२३४५६७८९"
_NUMBER = re.compile(rf"[0-9{_DIGITS}]+(?:,[0-9{_DIGITS}]+)*(?:\.[0-9{_DIGITS}]+)?")
_LATIN = re.compile(r"[A-Za-z]")

# 0-99 have their own words in Nepali (common spellings; regional variants exist).
_UNDER_100 = (
    "शून्य एक दुई तीन चार पाँच छ सात आठ नौ दस एघार बाह्र तेह्र चौध पन्ध्र सोह्र सत्र अठार उन्नाइस "
    "बीस एक्काइस बाइस तेइस चौबीस पच्चीस छब्बीस सत्ताइस अट्ठाइस उनन्तीस तीस एकतीस बत्तीस तेत्तीस चौँतीस "
    "पैँतीस छत्तीस सैँतीस अठतीस उनन्चालीस चालीस एकचालीस बयालीस त्रिचालीस चवालीस पैँतालीस छयालीस "
    "सतचालीस अठचालीस उनन्चास पचास एकाउन्न बाउन्न त्रिपन्न चउन्न पचपन्न छपन्न सन्ताउन्न अन्ठाउन्न उनन्साठी "
    "साठी एकसट्ठी बयसट्ठी त्रिसट्ठी चौसट्ठी पैँसट्ठी छयसट्ठी सतसट्ठी अठसट्ठी उनन्सत्तरी सत्तरी एकहत्तर "
    "बहत्तर त्रिहत्तर चौहत्तर पचहत्तर छयहत्तर सतहत्तर अठहत्तर उनासी असी एकासी बयासी त्रियासी चौरासी "
    "पचासी छयासी सतासी अठासी उनान्नब्बे नब्बे एकान्नब्बे बयान्नब्बे त्रियान्नब्बे चौरान्नब्बे पन्चानब्बे "
    "छयान्नब्बे सन्तान्नब्बे अन्ठान्नब्बे उनान्सय"
).split()
_SCALES = ((10**9, "अरब"), (10**7, "करोड"), (10**5, "लाख"), (1000, "हजार"), (100, "सय"))


def number_to_words(n: int) -> str:
    """Nepali number words with the Indian grouping: 2081 → "दुई हजार एकासी", 150000 → "एक लाख पचास हजार"."""
    if n < 100:
        return _UNDER_100[n]
    words = []
    for value, name in _SCALES:
        if n >= value:
            words += [number_to_words(n // value), name]
            n %= value
    if n:
        words.append(_UNDER_100[n])
    return " ".join(words)


def _spell_number(match: re.Match) -> str:
    text = match.group().translate(str.maketrans(_DIGITS, "0123456789")).replace(",", "")
    whole, _, fraction = text.partition(".")
    spoken = number_to_words(int(whole))
    if fraction:
        spoken += " दशमलव " + " ".join(_UNDER_100[int(d)] for d in fraction)
    return f" {spoken} "


def normalize_text(
    text: str, lowercase: bool = True, remove_punctuation: bool = True, digits: str = "keep", latin: str = "keep"
) -> tuple[str, str]:
    """(normalised text, rejection reason or ""). Vowel signs and viramas are marks (Mn/Mc), not punctuation."""
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE).replace("\u00a0", " ")
    if latin == "drop_utterance" and _LATIN.search(text):
        return "", "latin letters"
    if _NUMBER.search(text):
        if digits == "drop_utterance":
            return "", "digits"
        if digits == "words":
            text = _NUMBER.sub(_spell_number, text)
    if remove_punctuation:
        text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    if lowercase:
        text = text.lower()
    return _SPACES.sub(" ", text).strip(), ""
