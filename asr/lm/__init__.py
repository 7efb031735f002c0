"""n-gram language-model decoding for CTC models: build (KenLM), decode (pyctcdecode), tune alpha/beta.

    python -m asr.lm build run_dir=outputs/<date>/<time>     # word LM from the run's train transcripts
    python -m asr.lm tune run_dir=outputs/<date>/<time>      # alpha/beta on saved dev logits
    python -m asr.evaluate run_dir=outputs/<date>/<time> decoder=beam_lm

An LM lives in a folder (by default `<model folder>/lm/`): `lm.arpa`, `lm.bin` (KenLM binary),
`unigrams.txt` (the LM's words, for pyctcdecode) and `lm.json` (how it was built, and the tuned
alpha/beta once `tune` ran). A model folder that carries one is decoded with it by default.
"""

from __future__ import annotations

from pathlib import Path

from asr.errors import ConfigError

LM_DIR = "lm"  # sub-folder of a model folder that holds its LM
INFO_FILE = "lm.json"


class LMError(ConfigError):
    """A user's mistake around LM building or decoding (one line on stderr): the message says what to fix."""


def lm_dir_of(model_dir: str | Path) -> Path:
    return Path(model_dir) / LM_DIR
