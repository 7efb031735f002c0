"""A split's CTC log-probabilities, computed once per model and split and cached on disk.

Decoding with another beam width, LM or alpha/beta then needs no forward pass: `asr.evaluate`
saves them, `python -m asr.lm tune` decodes the dev split's hundreds of times. The cache key is
the model's weights (file sizes and times) and the split's utterances, under
`<paths.cache_dir>/logits/`. Each utterance keeps only its real frames (padding cut off), as
float32 log-probabilities (float16 could flip a near-tie argmax: greedy results must not move).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import Wav2Vec2BertForCTC, Wav2Vec2BertProcessor

from asr.collator import CTCCollator

log = logging.getLogger(__name__)

LOGITS_VERSION = 1  # bump when what is stored changes


def model_fingerprint(model_dir: str | Path) -> str:
    """Weights and config files of a saved model: name, size, modification time."""
    folder = Path(model_dir).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    state = [str(folder)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]


def split_key(split: Dataset) -> str:
    return hashlib.sha256(json.dumps([list(split["id"]), list(split["input_length"])]).encode()).hexdigest()[:16]


@torch.inference_mode()
def compute_log_probs(
    model: Wav2Vec2BertForCTC,
    processor: Wav2Vec2BertProcessor,
    features: Dataset,
    batch_size: int,
    desc: str = "Computing logits",
) -> list[np.ndarray]:
    """Per utterance, in the dataset's order: (real frames × vocabulary) log-softmax, float32."""
    order = np.argsort(-np.asarray(features["input_length"]), kind="stable")  # longest first: little padding
    collate = CTCCollator(processor)
    out: list[np.ndarray | None] = [None] * len(order)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        rows = order[start : start + batch_size]
        batch = collate([{"input_features": features[int(i)]["input_features"]} for i in rows])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        log_probs = torch.log_softmax(model(**batch).logits.float(), dim=-1).cpu().numpy()
        lengths = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1)).cpu().numpy()
        for row, matrix, length in zip(rows, log_probs, lengths):
            out[int(row)] = matrix[: int(length)]  # padded frames dropped: they never reach a decoder
    return out


def save_log_probs(path: Path, ids: list[str], log_probs: list[np.ndarray], key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(
        partial,
        ids=np.asarray(ids),
        lengths=np.asarray([len(lp) for lp in log_probs]),
        data=np.concatenate(log_probs).astype(np.float32),
        key=json.dumps(key),
    )
    partial.replace(path)


def load_log_probs(path: Path) -> tuple[list[str], list[np.ndarray], dict]:
    with np.load(path) as saved:
        data = saved["data"]
        ends = np.cumsum(saved["lengths"])
        arrays = [data[end - n : end] for end, n in zip(ends, saved["lengths"])]
        return saved["ids"].tolist(), arrays, json.loads(str(saved["key"]))


def cached_log_probs(
    model_dir: str | Path,
    model: Wav2Vec2BertForCTC,
    processor: Wav2Vec2BertProcessor,
    split: Dataset,
    split_name: str,
    cache_dir: str | Path,
    batch_size: int,
) -> tuple[list[np.ndarray], Path]:
    """The split's log-probabilities from the cache, or computed now and saved there."""
    ids = list(split["id"])
    key = {"version": LOGITS_VERSION, "model": model_fingerprint(model_dir), "split": split_key(split)}
    path = Path(cache_dir) / "logits" / f"{split_name}-{key['model']}-{key['split']}.npz"
    if path.is_file():
        saved_ids, arrays, saved_key = load_log_probs(path)
        if saved_key == key and saved_ids == ids:
            log.info("Logits of %s read from %s", split_name, path)
            return arrays, path
    arrays = compute_log_probs(model, processor, split, batch_size, desc=f"Computing {split_name} logits")
    save_log_probs(path, ids, arrays, key)
    log.info("Logits of %s saved to %s", split_name, path)
    return arrays, path
