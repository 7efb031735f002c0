"""Datasets as rows of (id, audio_path, text, speaker, duration), one loader per `dataset.loader`.

Every loader returns the same columns, so normalisation, features and training never need to
know where the audio came from. A new source (OpenSLR 54, the Hub) is one more entry in LOADERS.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from asr.errors import UserError

if TYPE_CHECKING:  # datasets is imported lazily: corpus-generation workers must start fast
    from datasets import Dataset, DatasetDict

SPLITS = ("train", "dev", "test")

Rows = list[dict]


class DataError(UserError, ValueError):
    """Bad or missing input data; the message names the file and the fix."""


def _loaders() -> dict[str, Callable[[DictConfig], dict[str, Rows]]]:
    from asr.data import hf_hub, manifest, openslr54, synthetic_ne

    return {
        "hf_hub": hf_hub.load_rows,
        "manifest": manifest.load_rows,
        "openslr54": openslr54.load_rows,
        "synthetic_ne": synthetic_ne.load_rows,
    }


def load_splits(cfg: DictConfig) -> DatasetDict:
    """Rows of every split as a DatasetDict; an empty split is an error, not a silent 0-WER."""
    from datasets import Dataset, DatasetDict

    loaders = _loaders()
    if cfg.loader not in loaders:
        raise DataError(f"unknown dataset.loader={cfg.loader!r}; known loaders: {sorted(loaders)}")
    rows = loaders[cfg.loader](cfg)
    for split in SPLITS:
        limit = cfg.max_utterances[split]
        if limit is not None:
            rows[split] = rows.get(split, [])[:limit]
        if not rows.get(split):
            raise DataError(
                f"the {split!r} split of dataset {cfg.name!r} is empty. Fix: give it utterances "
                f"(dataset.{split}=... or a larger dataset.{split}_fraction)"
            )
    return DatasetDict({split: Dataset.from_list(rows[split]) for split in SPLITS})


def split_fingerprint(split: Dataset) -> str:
    """Hash of a split's rows and of its audio files' size and mtime: a replaced file changes it."""
    from asr.data.audio import source_file

    digest = hashlib.sha256()
    for row in split.select_columns(["id", "audio_path", "text", "speaker"]):
        source = source_file(row["audio_path"])
        stat = (
            (source.stat().st_size, source.stat().st_mtime_ns) if source.exists() else None
        )  # missing: the audit says so
        digest.update(json.dumps([row, stat], sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def fingerprint(splits: DatasetDict, settings: dict | None = None) -> str:
    """One hash for the whole dataset (rows, files, normalised text, split) and the settings that
    decide what training sees of it: two runs with the same value saw the same data."""
    parts = [f"{split}:{split_fingerprint(splits[split])}" for split in SPLITS]
    parts.append(json.dumps(settings or {}, sort_keys=True, default=str))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
