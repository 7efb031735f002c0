"""Datasets from the Hugging Face Hub, or local parquet/arrow files, with an audio column.

datasets' own `Audio` decoding needs torchcodec (a CUDA build of torch and FFmpeg), so the
audio column is read undecoded: embedded bytes are written once to files under
`<cache_dir>/<dataset fingerprint>/` (our decoder then reads them like any other file);
columns that hold paths are used as they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from asr.data import SPLITS, DataError, Rows
from asr.data.manifest import carve_split

SCRIPT_DATASET_HELP = (
    "Script-based Hub datasets (e.g. spktsagar/openslr-nepali-asr-cleaned) are refused by current `datasets`; "
    "use a parquet mirror, dataset=openslr54 with the original download, or dataset.path=parquet with local files"
)


def _load_split(cfg: DictConfig, split: str):
    from datasets import Audio, load_dataset

    data_files = OmegaConf.to_container(cfg.data_files, resolve=True) if cfg.data_files else None
    try:
        dataset = load_dataset(cfg.path, cfg.config_name, split=split, data_files=data_files, revision=cfg.revision)
    except Exception as err:  # noqa: BLE001  (network, auth, missing split, script datasets: all end here)
        raise DataError(
            f"could not load split {split!r} of {cfg.path!r} ({type(err).__name__}: {err}). Fix: check "
            f"dataset.path/config_name/splits, run `hf auth login` for gated datasets. {SCRIPT_DATASET_HELP}"
        ) from err
    wanted = [c for c in (cfg.audio_column, cfg.text_column, cfg.speaker_column, cfg.id_column) if c]
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{cfg.path} ({split}) has no column(s) {missing}; its columns are {dataset.column_names}. "
            "Fix: set dataset.audio_column / text_column / speaker_column / id_column"
        )
    return dataset.cast_column(cfg.audio_column, Audio(decode=False)).select_columns(wanted)


def _rows(dataset, cfg: DictConfig, split: str, folder: Path) -> Rows:
    """One row per example; embedded audio bytes become files in `folder` (written once)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, example in enumerate(dataset):
        utt_id = str(example[cfg.id_column]) if cfg.id_column else f"{split}-{index:07d}"
        audio = example[cfg.audio_column]
        if audio.get("bytes"):
            suffix = Path(audio.get("path") or ".flac").suffix or ".flac"
            target = folder / f"{hashlib.sha1(utt_id.encode()).hexdigest()[:16]}{suffix}"
            if not target.is_file():
                target.write_bytes(audio["bytes"])
            audio_path = str(target)
        elif audio.get("path"):
            audio_path = audio["path"]
        else:
            raise DataError(f"{cfg.path} ({split}) example {index} has neither audio bytes nor a path")
        rows.append(
            {
                "id": utt_id,
                "audio_path": audio_path,
                "text": str(example[cfg.text_column]),
                "speaker": str(example[cfg.speaker_column]) if cfg.speaker_column else "",
                "duration": 0.0,
            }
        )
    return rows


def load_rows(cfg: DictConfig) -> dict[str, Rows]:
    rows: dict[str, Rows] = {}
    for ours in SPLITS:
        theirs = cfg.splits.get(ours)
        if theirs:
            dataset = _load_split(cfg, theirs)
            rows[ours] = _rows(dataset, cfg, ours, Path(cfg.cache_dir).expanduser() / dataset._fingerprint)
    if "train" not in rows:
        raise DataError(
            "dataset.splits.train is not set: name the dataset's training split, e.g. dataset.splits.train=train"
        )
    for offset, split in enumerate(("dev", "test")):
        if split not in rows:
            rows["train"], rows[split] = carve_split(rows["train"], cfg[f"{split}_fraction"], cfg.split_seed + offset)
    return rows
