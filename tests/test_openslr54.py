"""OpenSLR 54 in its original layout, extracted and zipped, built from the built-in corpus."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SESSION_DIR, compose_cfg

from asr.data import DataError, load_splits
from asr.data.audio import load_audio
from asr.features import build_processor, build_vocab, extract_features, normalize_splits
from asr.model import load_feature_extractor

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`

TINY = [
    "dataset.sizes.train=30",
    "dataset.sizes.dev=5",
    "dataset.sizes.test=5",
    f"dataset.cache_dir={SESSION_DIR / 'corpus'}",
]


@pytest.fixture(scope="module")
def openslr_layout(tmp_path_factory):
    """Both layouts of the same 40 utterances: `extracted/` and `zipped/` (two archives, like asr_nepali_0..f)."""
    rows = [row for split in load_splits(compose_cfg(*TINY).dataset).values() for row in split]
    root = tmp_path_factory.mktemp("openslr54")
    extracted, zipped = root / "extracted", root / "zipped"
    lines = []
    for index, row in enumerate(rows):
        utt_id = hashlib.sha1(row["id"].encode()).hexdigest()[:10]
        target = extracted / "asr_nepali" / "data" / utt_id[:2] / f"{utt_id}.flac"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["audio_path"], target)
        lines.append(f"{utt_id}\tspk{index % 20:02d}\t{row['text']}।")  # the real transcripts end with a danda
    (extracted / "utt_spk_text.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    zipped.mkdir()
    shutil.copy(extracted / "utt_spk_text.tsv", zipped)
    for half, prefixes in (("0", "01234567"), ("8", "89abcdef")):
        with zipfile.ZipFile(zipped / f"asr_nepali_{half}.zip", "w") as archive:
            for flac in sorted((extracted / "asr_nepali" / "data").glob("*/*.flac")):
                if flac.stem[0] in prefixes:
                    archive.write(flac, f"asr_nepali/data/{flac.parent.name}/{flac.name}")
    return extracted, zipped, rows


def _cfg(root: Path, *extra: str):
    return compose_cfg(
        "dataset=openslr54",
        f"dataset.root={root}",
        "dataset.dev_fraction=0.25",
        "dataset.test_fraction=0.25",
        f"paths.cache_dir={SESSION_DIR / 'cache'}",
        *extra,
    )


def test_extracted_and_zipped_layouts_give_the_same_rows(openslr_layout):
    extracted, zipped, rows = openslr_layout
    plain, packed = load_splits(_cfg(extracted).dataset), load_splits(_cfg(zipped).dataset)
    for split in ("train", "dev", "test"):
        assert plain[split]["id"] == packed[split]["id"] and plain[split]["text"] == packed[split]["text"]
    assert sum(len(s) for s in plain.values()) == len(rows)
    member = packed["train"][0]["audio_path"]
    assert ".zip::asr_nepali/data/" in member
    assert np.array_equal(load_audio(member, 16000), load_audio(plain["train"][0]["audio_path"], 16000))


def test_split_is_speaker_disjoint_and_deterministic(openslr_layout):
    extracted, _, _ = openslr_layout
    first, again = load_splits(_cfg(extracted).dataset), load_splits(_cfg(extracted).dataset)
    speakers = {split: set(first[split]["speaker"]) for split in first}
    assert speakers["dev"] and speakers["test"]
    assert (
        not speakers["train"] & speakers["dev"]
        and not speakers["train"] & speakers["test"]
        and not speakers["dev"] & speakers["test"]
    )
    assert all(first[split]["id"] == again[split]["id"] for split in first)
    other = load_splits(_cfg(extracted, "dataset.split_seed=5").dataset)
    assert set(other["test"]["speaker"]) != speakers["test"]


def test_features_read_from_zip_members_in_parallel(openslr_layout):
    _, zipped, _ = openslr_layout
    cfg = _cfg(zipped)
    splits = normalize_splits(load_splits(cfg.dataset), cfg.dataset.text)
    assert not any("।" in text for text in splits["train"]["text"])
    processor = build_processor(
        build_vocab(splits["train"]["text"]), load_feature_extractor(cfg.model), SESSION_DIR / "openslr-model"
    )
    features = extract_features(splits, processor, cfg.dataset, Path(cfg.paths.cache_dir) / "features")  # num_proc=2
    assert all(length > 40 for split in features.values() for length in split["input_length"])


def test_missing_root_and_missing_audio_say_what_to_do(openslr_layout, tmp_path):
    with pytest.raises(DataError, match="openslr.org/54"):
        load_splits(_cfg(tmp_path / "nowhere").dataset)
    extracted, _, _ = openslr_layout
    partial = tmp_path / "partial"
    shutil.copytree(extracted, partial)
    removed = next((partial / "asr_nepali" / "data").glob("*/*.flac"))
    removed.unlink()
    with pytest.raises(DataError, match="allow_missing_audio"):
        load_splits(_cfg(partial).dataset)


def test_allowed_missing_audio_is_listed_in_the_audit_report(openslr_layout, tmp_path):
    """`python -m asr.audit dataset=openslr54 ... dataset.allow_missing_audio=true`: every utterance
    listed without audio is in data_audit.json as missing_file and counted in the summary line."""
    extracted, _, _ = openslr_layout
    partial = tmp_path / "partial"
    shutil.copytree(extracted, partial)
    removed = sorted((partial / "asr_nepali" / "data").glob("*/*.flac"))[:2]
    for flac in removed:
        flac.unlink()
    out = tmp_path / "audit"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr.audit",
            "dataset=openslr54",
            f"dataset.root={partial}",
            "dataset.allow_missing_audio=true",
            "dataset.dev_fraction=0.25",
            "dataset.test_fraction=0.25",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "data_audit.json").read_text(encoding="utf-8"))
    missing = {f["id"] for f in report["files"] if f["reason"] == "missing_file"}
    assert missing == {flac.stem for flac in removed}
    assert report["by_reason"]["missing_file"] == 2
    assert "missing_file 2" in result.stderr + result.stdout  # the summary line


def test_a_published_split_overrides_the_hashed_one(openslr_layout, tmp_path):
    extracted, _, _ = openslr_layout
    ids = sorted(p.stem for p in (extracted / "asr_nepali" / "data").glob("*/*.flac"))
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"dev": ids[:3], "test": ids[3:7]}))
    splits = load_splits(_cfg(extracted, f"dataset.split_ids={split_file}").dataset)
    assert (
        sorted(splits["dev"]["id"]) == ids[:3]
        and sorted(splits["test"]["id"]) == ids[3:7]
        and len(splits["train"]) == len(ids) - 7
    )
