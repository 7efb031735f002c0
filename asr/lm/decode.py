"""CTC decoders over one utterance's log-probabilities: greedy, beam search, beam search + n-gram LM.

Beam search is pyctcdecode's (called directly: transformers 5 deprecates Wav2Vec2ProcessorWithLM).
Its alphabet comes from the tokenizer: the pad token is the CTC blank, the word delimiter `|` is
the space, [UNK] is pyctcdecode's `⁇` (turned back into [UNK] in the text), and tokens CTC never
emits (`<s>`, `</s>`) are left out. Logits are cut at each utterance's true length before decoding,
so padded frames cannot add letters, as in greedy decoding (asr.inference.blank_padded_frames).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from pyctcdecode.constants import DEFAULT_ALPHA, DEFAULT_BETA  # used until `python -m asr.lm tune` has run
from transformers import Wav2Vec2CTCTokenizer

from asr.lm import INFO_FILE, LMError, lm_dir_of

log = logging.getLogger(__name__)
logging.getLogger("pyctcdecode").setLevel(logging.WARNING)  # it logs its alphabet guesses at INFO on every build

DECODERS = ("greedy", "beam", "beam_lm")
UNK_LABEL = "⁇"  # pyctcdecode's unknown-token label


def ctc_alphabet(tokenizer: Wav2Vec2CTCTokenizer, n_columns: int) -> tuple[list[str], np.ndarray]:
    """pyctcdecode labels and the logits columns they stand for (blank "", space " ", unknown ⁇)."""
    never_emitted = set(tokenizer.all_special_tokens) - {
        tokenizer.pad_token,
        tokenizer.unk_token,
        tokenizer.word_delimiter_token,
    }
    labels, columns = [], []
    for index in range(n_columns):
        token = tokenizer.convert_ids_to_tokens(index)
        if index == tokenizer.pad_token_id:
            label = ""
        elif token == tokenizer.word_delimiter_token:
            label = " "
        elif token == tokenizer.unk_token:
            label = UNK_LABEL
        elif token is None or token in never_emitted:
            continue
        else:
            label = token
        labels.append(label)
        columns.append(index)
    if "" not in labels or " " not in labels:
        raise LMError(
            "the tokenizer has no pad token (CTC blank) or no word delimiter '|': it is not a CTC character tokenizer"
        )
    return labels, np.asarray(columns)


def read_lm_info(lm_dir: Path) -> dict:
    info_file = lm_dir / INFO_FILE
    if not info_file.is_file():
        raise LMError(
            f"no language model in {lm_dir}. Fix: python -m asr.lm build run_dir=<training run> "
            "(or lm.path=<folder made by asr.lm build>)"
        )
    return json.loads(info_file.read_text(encoding="utf-8"))


@dataclass
class BeamSettings:
    beam_width: int = 32  # hypotheses kept per frame
    beam_prune_logp: float = -10.0  # drop beams this much (natural log) below the best
    token_min_logp: float = -5.0  # skip tokens below this log-probability (unless the frame's argmax)
    alpha: float | None = None  # LM weight; None = tuned value in lm.json, else DEFAULT_ALPHA
    beta: float | None = None  # word insertion bonus; None = tuned value, else DEFAULT_BETA

    @classmethod
    def from_config(cls, lm_cfg: DictConfig) -> BeamSettings:
        return cls(lm_cfg.beam_width, lm_cfg.beam_prune_logp, lm_cfg.token_min_logp, lm_cfg.alpha, lm_cfg.beta)


class CTCDecoder:
    """decode(log_probs of one utterance, frames × vocabulary) → text, with the chosen decoder."""

    def __init__(
        self,
        kind: str,
        tokenizer: Wav2Vec2CTCTokenizer,
        n_columns: int,
        lm_dir: Path | None = None,
        beam: BeamSettings | None = None,
    ) -> None:
        if kind not in DECODERS:
            raise LMError(f"decoder={kind!r}: choose one of {', '.join(DECODERS)} (or auto)")
        self.kind, self.tokenizer, self.beam = kind, tokenizer, beam or BeamSettings()
        self.lm_dir, self.lm_info, self._beam_search = None, None, None
        if kind == "greedy":
            return
        from pyctcdecode import build_ctcdecoder  # imported here: greedy decoding needs neither it nor kenlm

        labels, self.columns = ctc_alphabet(tokenizer, n_columns)
        if kind == "beam":
            self._beam_search = build_ctcdecoder(labels)
            return
        self.lm_dir = Path(lm_dir)
        self.lm_info = read_lm_info(self.lm_dir)
        unigrams = (self.lm_dir / "unigrams.txt").read_text(encoding="utf-8").split()
        alpha = _first_set(self.beam.alpha, self.lm_info.get("alpha"), DEFAULT_ALPHA)
        beta = _first_set(self.beam.beta, self.lm_info.get("beta"), DEFAULT_BETA)
        self._beam_search = build_ctcdecoder(
            labels, str(self.lm_dir / self.lm_info["model_file"]), unigrams, alpha=float(alpha), beta=float(beta)
        )
        self.set_weights(float(alpha), float(beta))

    def set_weights(self, alpha: float, beta: float) -> None:
        """New LM weight and word bonus without reloading the LM (what tuning changes per trial)."""
        self.beam.alpha, self.beam.beta = float(alpha), float(beta)
        self._beam_search.reset_params(alpha=float(alpha), beta=float(beta))

    def decode(self, log_probs: np.ndarray) -> str:
        if self.kind == "greedy":
            return self.tokenizer.decode(log_probs.argmax(-1))
        text = self._beam_search.decode(
            np.asarray(log_probs[:, self.columns], dtype=np.float32),
            beam_width=self.beam.beam_width,
            beam_prune_logp=self.beam.beam_prune_logp,
            token_min_logp=self.beam.token_min_logp,
        )
        return text.replace(UNK_LABEL, self.tokenizer.unk_token)

    def decode_all(self, log_probs: list[np.ndarray]) -> tuple[list[str], float]:
        """Transcripts and the mean decoding time per utterance in seconds."""
        started = time.perf_counter()
        texts = [self.decode(lp) for lp in log_probs]
        return texts, (time.perf_counter() - started) / max(len(log_probs), 1)

    def describe(self) -> dict:
        """What decoded: written to reports and MLflow."""
        if self.kind == "greedy":
            return {"decoder": "greedy"}
        info = {
            "decoder": self.kind,
            "beam_width": self.beam.beam_width,
            "beam_prune_logp": self.beam.beam_prune_logp,
            "token_min_logp": self.beam.token_min_logp,
        }
        if self.kind == "beam_lm":
            info.update(lm=str(self.lm_dir), alpha=self.beam.alpha, beta=self.beam.beta, lm_order=self.lm_info["order"])
        return info


def _first_set(*values):
    return next(value for value in values if value is not None)


def lm_folder(lm_cfg: DictConfig, model_dir: str | Path) -> Path:
    """lm.path when set, else the model folder's own lm/ sub-folder."""
    return Path(lm_cfg.path) if lm_cfg.get("path") else lm_dir_of(model_dir)


def resolve_decoder_name(name: str, lm_dir: Path) -> str:
    """auto = beam_lm when an LM has been built for this model, else greedy."""
    if name == "auto":
        return "beam_lm" if (lm_dir / INFO_FILE).is_file() else "greedy"
    return name


def build_decoder(
    name: str, lm_cfg: DictConfig, tokenizer: Wav2Vec2CTCTokenizer, n_columns: int, model_dir: str | Path
) -> CTCDecoder:
    lm_dir = lm_folder(lm_cfg, model_dir)
    return CTCDecoder(
        resolve_decoder_name(name, lm_dir), tokenizer, n_columns, lm_dir, BeamSettings.from_config(lm_cfg)
    )
