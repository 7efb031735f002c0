"""OpenSLR 54 (Large Nepali ASR training data), read in its original layout.

    <root>/utt_spk_text.tsv                 utterance_id <TAB> speaker_id <TAB> transcription
    <root>/[asr_nepali/]data/<id[:2]>/<id>.flac         extracted, or still inside
    <root>/asr_nepali_<0-f>.zip                          the downloaded archives (read in place)

The corpus ships as one split; dev and test are held out by hashing speaker ids, so no speaker
is in two splits and everyone who uses the same fractions and seed gets the same split.
"""

from __future__ import annotations

import csv
import json
import logging
import zipfile
from pathlib import Path

from omegaconf import DictConfig

from asr.data import DataError, Rows
from asr.data.audio import zip_member_path
from asr.data.manifest import carve_split

log = logging.getLogger(__name__)

DOWNLOAD_HELP = (
    "Download OpenSLR 54 from https://www.openslr.org/54/ (utt_spk_text.tsv and asr_nepali_0.zip ... "
    "asr_nepali_f.zip, ~9 GB), put them in one folder and set dataset.root=<that folder>; the zips may "
    "stay zipped or be extracted there."
)


def _transcripts(root: Path) -> list[tuple[str, str, str]]:
    tsv = next((p for p in (root / "utt_spk_text.tsv", root / "asr_nepali" / "utt_spk_text.tsv") if p.is_file()), None)
    if tsv is None:
        raise DataError(f"no utt_spk_text.tsv in {root}. {DOWNLOAD_HELP}")
    rows = []
    with tsv.open(encoding="utf-8", newline="") as lines:
        for lineno, fields in enumerate(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not fields:
                continue
            if len(fields) != 3:
                raise DataError(
                    f"{tsv}:{lineno}: expected utterance_id<TAB>speaker_id<TAB>text, got {len(fields)} fields"
                )
            rows.append((fields[0].strip(), fields[1].strip(), fields[2]))
    return rows


def _audio_index(root: Path) -> dict[str, str]:
    """utterance id → a path load_audio reads: a file on disk, or `<archive>::<member>` inside a zip."""
    index: dict[str, str] = {}
    for archive in sorted(root.glob("asr_nepali*.zip")):
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():
                if member.endswith(".flac"):
                    index[Path(member).stem] = zip_member_path(archive, member)
    for data in (root / "data", root / "asr_nepali" / "data"):  # extracted files win over archives
        if data.is_dir():
            index.update({path.stem: str(path) for path in data.glob("*/*.flac")})
    return index


def load_rows(cfg: DictConfig) -> dict[str, Rows]:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.root={root} does not exist. {DOWNLOAD_HELP}")
    audio = _audio_index(root)
    if not audio:
        raise DataError(f"no audio in {root}: expected data/<xx>/<id>.flac or asr_nepali_*.zip. {DOWNLOAD_HELP}")
    rows, missing = [], []
    for utt_id, speaker, text in _transcripts(root):
        # an utterance without audio keeps the path it would have: the audit lists it as missing_file
        path = audio.get(utt_id) or str(root / "data" / utt_id[:2] / f"{utt_id}.flac")
        rows.append({"id": utt_id, "audio_path": path, "text": text, "speaker": speaker, "duration": 0.0})
        if utt_id not in audio:
            missing.append(utt_id)
    if missing:
        message = f"{len(missing)} utterances of utt_spk_text.tsv have no audio in {root}, e.g. {missing[:5]}"
        if not cfg.allow_missing_audio:
            raise DataError(f"{message}. Fix: download/extract every archive, or set dataset.allow_missing_audio=true")
        log.warning(
            "%s; training on the %d that have (listed as missing_file in data_audit.json)",
            message,
            len(rows) - len(missing),
        )
    if cfg.split_ids:
        return _given_split(rows, Path(cfg.split_ids).expanduser())
    train, test = carve_split(rows, cfg.test_fraction, cfg.split_seed)
    train, dev = carve_split(train, cfg.dev_fraction, cfg.split_seed + 1)
    return {"train": train, "dev": dev, "test": test}


def _given_split(rows: Rows, path: Path) -> dict[str, Rows]:
    """A published split: {"dev": [ids], "test": [ids]} (optionally "train"); unlisted ids go to train."""
    if not path.is_file():
        raise DataError(
            f'dataset.split_ids={path} does not exist. Fix: a JSON file {{"dev": [ids...], "test": [ids...]}}'
        )
    given = {split: set(ids) for split, ids in json.loads(path.read_text(encoding="utf-8")).items()}
    held = given.get("dev", set()) | given.get("test", set())
    out = {
        "dev": [r for r in rows if r["id"] in given.get("dev", ())],
        "test": [r for r in rows if r["id"] in given.get("test", ())],
    }
    out["train"] = [r for r in rows if r["id"] not in held and ("train" not in given or r["id"] in given["train"])]
    return out
