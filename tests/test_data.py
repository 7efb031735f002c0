"""Loaders: the synthetic corpus (deterministic, disjoint, cached) and manifests (clear errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import compose_cfg

from asr.data import DataError, load_splits
from asr.data import espeak as espeak_module
from asr.data.espeak import EspeakNotFoundError
from asr.data.synthetic_ne import generate
from asr.features import build_processor, build_vocab, extract_features
from asr.model import load_feature_extractor

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`

TINY_CORPUS = ["dataset.sizes.train=8", "dataset.sizes.dev=3", "dataset.sizes.test=3"]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "corpus.json"
    }


def test_synthetic_corpus_is_deterministic(tmp_path):
    first = generate(compose_cfg(*TINY_CORPUS, f"dataset.cache_dir={tmp_path / 'a'}").dataset)
    second = generate(compose_cfg(*TINY_CORPUS, f"dataset.cache_dir={tmp_path / 'b'}").dataset)
    other_seed = generate(compose_cfg(*TINY_CORPUS, "dataset.seed=7", f"dataset.cache_dir={tmp_path / 'c'}").dataset)
    assert first.name == second.name != other_seed.name  # folder = content hash of the recipe
    assert _files(first) == _files(second)
    assert len([name for name in _files(first) if name.endswith(".flac")]) == 14
    assert _files(first)["train.jsonl"] != _files(other_seed)["train.jsonl"]


def test_synthetic_corpus_audio_and_splits(tmp_path):
    cfg = compose_cfg(*TINY_CORPUS, f"dataset.cache_dir={tmp_path}").dataset
    splits = load_splits(cfg)
    assert {name: len(split) for name, split in splits.items()} == {"train": 8, "dev": 3, "test": 3}
    texts = {name: set(split["text"]) for name, split in splits.items()}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    for row in splits["train"]:
        audio, rate = sf.read(row["audio_path"])
        assert rate == 16000 and audio.ndim == 1
        assert 3 <= len(row["text"].split()) <= 8
        assert 0.5 < len(audio) / rate == pytest.approx(row["duration"], abs=1e-3)
        assert np.abs(audio).max() > 0.05  # speech, not silence
    assert len(set(splits["train"]["speaker"])) > 1


def test_synthetic_corpus_is_generated_once(tmp_path, monkeypatch):
    cfg = compose_cfg(*TINY_CORPUS, f"dataset.cache_dir={tmp_path}").dataset
    folder = generate(cfg)
    stamp = (folder / "train.jsonl").stat().st_mtime_ns
    monkeypatch.setattr("asr.data.synthetic_ne.plan", lambda *a: pytest.fail("regenerated a cached corpus"))
    assert generate(cfg) == folder
    assert (folder / "train.jsonl").stat().st_mtime_ns == stamp


def test_missing_espeak_names_both_fixes(monkeypatch):
    def no_library():
        raise OSError("libespeak-ng.so: cannot open shared object file")

    monkeypatch.setattr(espeak_module, "_LibrarySpeaker", no_library)
    monkeypatch.setattr(espeak_module.shutil, "which", lambda name: None)
    with pytest.raises(EspeakNotFoundError, match="pip install espeakng-loader") as err:
        espeak_module.load_speaker()
    assert "apt-get install espeak-ng" in str(err.value)


# ---- manifests -------------------------------------------------------------------------------


def _write_corpus(root: Path, rows: dict[str, list[tuple[str, str]]]) -> None:
    """rows: split → [(relative audio path, text)]; writes 1-second tones and one manifest per split."""
    rng = np.random.default_rng(0)
    for split, items in rows.items():
        lines = []
        for index, (audio, text) in enumerate(items):
            (root / audio).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / audio, rng.standard_normal(8000).astype(np.float32) * 0.1, 8000)  # 8 kHz on purpose
            lines.append(
                json.dumps({"audio_filepath": audio, "text": text, "speaker": f"s{index % 20}"}, ensure_ascii=False)
            )
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _manifest_cfg(root: Path, *extra: str):
    splits = [f"dataset.{s}={root / f'{s}.jsonl'}" for s in ("train", "dev", "test") if (root / f"{s}.jsonl").exists()]
    return compose_cfg("dataset=manifest", *splits, *extra).dataset


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    _write_corpus(
        tmp_path, {s: [(f"clips/{s}{i}.wav", "नमस्ते साथी") for i in range(3)] for s in ("train", "dev", "test")}
    )
    splits = load_splits(_manifest_cfg(tmp_path))
    assert splits["train"][0]["audio_path"] == str(tmp_path / "clips/train0.wav")
    assert splits["train"][0]["id"] == "clips/train0"


def test_manifest_without_dev_and_test_holds_out_whole_speakers(tmp_path):
    _write_corpus(tmp_path, {"train": [(f"c/{i}.wav", f"वाक्य {i}") for i in range(60)]})
    splits = load_splits(_manifest_cfg(tmp_path, "dataset.dev_fraction=0.3", "dataset.test_fraction=0.3"))
    speakers = {name: set(split["speaker"]) for name, split in splits.items()}
    assert sum(len(split) for split in splits.values()) == 60
    assert not speakers["train"] & speakers["dev"] and not speakers["train"] & speakers["test"]


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope.jsonl")):
        load_splits(compose_cfg("dataset=manifest", f"dataset.train={tmp_path / 'nope.jsonl'}").dataset)


def test_missing_audio_files_are_all_listed(tmp_path):
    _write_corpus(tmp_path, {"train": [(f"c/{i}.wav", "क ख") for i in range(4)]})
    (tmp_path / "c/1.wav").unlink()
    (tmp_path / "c/3.wav").unlink()
    with pytest.raises(DataError, match="2 of 4 audio files") as err:
        load_splits(_manifest_cfg(tmp_path))
    assert "c/1.wav" in str(err.value) and "c/3.wav" in str(err.value)


def test_bad_json_line_names_the_line(tmp_path):
    _write_corpus(tmp_path, {"train": [("c/0.wav", "क ख")]})
    with (tmp_path / "train.jsonl").open("a") as manifest:
        manifest.write('{"audio_filepath": "c/0.wav", "text": \n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        load_splits(_manifest_cfg(tmp_path))


def test_empty_split_is_an_error(tmp_path):
    _write_corpus(tmp_path, {s: [(f"{s}/0.wav", "क ख")] for s in ("train", "dev", "test")})
    (tmp_path / "dev.jsonl").write_text("\n")
    with pytest.raises(DataError, match="'dev' split .* is empty"):
        load_splits(_manifest_cfg(tmp_path))


def test_features_are_resampled_and_cached(tmp_path):
    _write_corpus(tmp_path, {s: [(f"{s}/{i}.wav", "क ख ग") for i in range(4)] for s in ("train", "dev", "test")})
    cfg = compose_cfg("dataset=manifest", *[f"dataset.{s}={tmp_path / f'{s}.jsonl'}" for s in ("train", "dev", "test")])
    splits = load_splits(cfg.dataset)
    processor = build_processor(
        build_vocab(splits["train"]["text"]), load_feature_extractor(cfg.model), tmp_path / "model"
    )
    features = extract_features(splits, processor, cfg.dataset, tmp_path / "cache")
    row = features["train"][0]
    assert row["duration"] == pytest.approx(1.0)  # 8000 samples at 8 kHz, resampled to 16 kHz
    assert np.asarray(row["input_features"]).shape == (row["input_length"], 160)
    assert 45 <= row["input_length"] <= 50  # 50 feature frames per second
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = extract_features(splits, processor, cfg.dataset, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    assert again["train"][0]["labels"] == row["labels"]
