"""Loading a saved model, blanking padded frames before decoding, and the predictions files
(predictions_<split>.jsonl) that runs and evaluations write; split log-probabilities for the
decoders are computed in asr.lm.logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Wav2Vec2BertForCTC, Wav2Vec2BertProcessor

from asr.errors import ConfigError
from asr.model import mask_adapter_padding


def blank_padded_frames(
    logits: torch.Tensor, attention_mask: torch.Tensor | None, model: Wav2Vec2BertForCTC
) -> torch.Tensor:
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


def write_predictions(
    path: Path, ids: list[str], speakers: list[str], references: list[str], hypotheses: list[str]
) -> None:
    """predictions_<split>.jsonl: one JSON line per utterance, what `asr.evaluate compare=...` pairs up by id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for utt_id, speaker, ref, hyp in zip(ids, speakers, references, hypotheses):
            out.write(
                json.dumps({"id": utt_id, "speaker": speaker, "reference": ref, "hypothesis": hyp}, ensure_ascii=False)
                + "\n"
            )


def read_predictions(folder: Path, split: str) -> dict[str, dict]:
    """The rows of <folder>/predictions_<split>.jsonl by utterance id."""
    path = folder / f"predictions_{split}.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist. Fix: evaluate that run first (python -m asr.evaluate run_dir={folder})"
        )
    return {row["id"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def load_model(model_dir: str | Path, device: str | None = None) -> tuple[Wav2Vec2BertForCTC, Wav2Vec2BertProcessor]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Wav2Vec2BertForCTC.from_pretrained(str(model_dir)).to(device).eval()
    mask_adapter_padding(model)  # transcripts independent of the padding in a batch (asr/model.py)
    return model, Wav2Vec2BertProcessor.from_pretrained(str(model_dir))
