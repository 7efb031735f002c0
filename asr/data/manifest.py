"""JSON-lines manifests (`audio_filepath`, `text`, optional `duration`, `speaker`, `id`).

The NeMo/ESPnet-style format most teams already have. Relative audio paths are relative to
the manifest's own folder, so a corpus folder can be moved or mounted anywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig

from asr.data import SPLITS, DataError, Rows

FORMAT_HELP = 'one JSON object per line, e.g. {"audio_filepath": "clips/a.flac", "text": "नमस्ते"}'


def read_manifest(path: str | Path) -> Rows:
    """Parse and check a manifest: every line valid, every audio file present (all listed at once)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist. Fix: point the dataset at a JSON-lines file ({FORMAT_HELP})")
    rows: Rows = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}). Expected {FORMAT_HELP}") from err
            missing = {"audio_filepath", "text"} - set(item)
            if missing:
                raise DataError(f"{path}:{lineno}: missing {sorted(missing)}. Expected {FORMAT_HELP}")
            audio = Path(item["audio_filepath"]).expanduser()
            audio = audio if audio.is_absolute() else path.parent / audio
            rows.append(
                {
                    "id": str(item.get("id") or Path(item["audio_filepath"]).with_suffix("").as_posix()),
                    "audio_path": str(audio),
                    "text": str(item["text"]),
                    "speaker": str(item.get("speaker") or ""),
                    "duration": float(item.get("duration") or 0.0),
                }
            )
    _check_audio_files_exist(path, rows)
    return rows


def _check_audio_files_exist(manifest: Path, rows: Rows) -> None:
    missing = [row["audio_path"] for row in rows if not Path(row["audio_path"]).is_file()]
    if missing:
        shown = "\n  ".join(missing[:10])
        raise DataError(
            f"{len(missing)} of {len(rows)} audio files listed in {manifest} do not exist:\n  {shown}\n"
            f"Fix: relative audio_filepath values are resolved against {manifest.parent}; "
            "correct the paths or remove those lines."
        )


def _held_out(key: str, seed: int) -> float:
    """A stable number in [0, 1) per key: the same utterance/speaker always lands in the same split."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 16**8


def carve_split(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Hold out ~fraction of rows, whole speakers at a time when speakers are known."""
    key = "speaker" if all(row["speaker"] for row in rows) else "id"
    held = [row for row in rows if _held_out(row[key], seed) < fraction]
    kept = [row for row in rows if _held_out(row[key], seed) >= fraction]
    return kept, held


def load_rows(cfg: DictConfig) -> dict[str, Rows]:
    """train is required; dev/test come from their own manifests or are carved out of train."""
    rows = {split: read_manifest(cfg[split]) for split in SPLITS if cfg.get(split)}
    if "train" not in rows:
        raise DataError(
            f"dataset.train is not set. Fix: dataset=manifest dataset.train=/path/train.jsonl ({FORMAT_HELP})"
        )
    for offset, split in enumerate(("dev", "test")):
        if split not in rows:
            rows["train"], rows[split] = carve_split(rows["train"], cfg[f"{split}_fraction"], cfg.split_seed + offset)
    return rows
