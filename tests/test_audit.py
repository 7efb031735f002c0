"""The audit: every reason on a purpose-made bad file; a corpus with corrupt files still trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import SESSION_DIR, compose_cfg
from transformers import Wav2Vec2BertForCTC

from asr import pipeline
from asr.audit import output_frames, run_audit
from asr.data import DataError, load_splits
from asr.features import build_processor, build_vocab, extract_features, normalize_splits
from asr.model import load_feature_extractor, shape_config

TINY = [
    "dataset.sizes.train=30",
    "dataset.sizes.dev=5",
    "dataset.sizes.test=5",
    f"dataset.cache_dir={SESSION_DIR / 'corpus'}",
]
EXPECTED = {  # file → reason (None: must pass the audit)
    "truncated.flac": "unreadable",
    "thirty_bytes.flac": "unreadable",
    "random.flac": "unreadable",
    "empty.flac": "unreadable",
    "nan.wav": "non_finite",
    "short_long_text.flac": "too_short",
    "silent.flac": "silent",
    "no_text.flac": "empty_text",
    "ctc_long_text.flac": "ctc_infeasible",
    "latin.flac": "text_rejected",
    "stereo44k.wav": None,
    "dots.flac": None,
}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """A manifest corpus: 30 good synthetic utterances + one file per audit reason, in train."""
    rows = load_splits(compose_cfg(*TINY).dataset)
    root = tmp_path_factory.mktemp("bad")
    speech, _ = sf.read(rows["train"][0]["audio_path"], dtype="float32")
    sf.write(root / "good_copy.flac", speech, 16000)
    flac = (root / "good_copy.flac").read_bytes()
    (root / "truncated.flac").write_bytes(flac[: len(flac) // 3])
    (root / "thirty_bytes.flac").write_bytes(flac[:30])
    (root / "random.flac").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "empty.flac").write_bytes(b"")
    sf.write(root / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(root / "short_long_text.flac", speech[:3200], 16000)  # 0.2 s
    sf.write(root / "ctc_long_text.flac", speech[:9600], 16000)  # 0.6 s = 15 output frames
    sf.write(root / "silent.flac", np.zeros(32000, np.float32), 16000)
    sf.write(root / "no_text.flac", speech, 16000)
    stereo = soxr.resample(speech, 16000, 44100)
    sf.write(root / "stereo44k.wav", np.stack([stereo, stereo * 0.5], axis=1), 44100)
    sf.write(root / "dots.flac", speech, 16000)
    sf.write(root / "latin.flac", speech, 16000)
    texts = {
        "short_long_text.flac": " ".join(rows["train"]["text"][:3]),
        "ctc_long_text.flac": " ".join(rows["train"]["text"][:3]),
        "no_text.flac": "।।",
        "dots.flac": rows["train"][0]["text"] + "...",
        "latin.flac": "मेरो laptop",
    }
    lines = [{"audio_filepath": r["audio_path"], "text": r["text"], "speaker": r["speaker"]} for r in rows["train"]]
    lines += [
        {"audio_filepath": name, "text": texts.get(name, rows["train"][0]["text"]), "speaker": "bad"}
        for name in EXPECTED
    ]
    for split, items in (("train", lines), ("dev", list(rows["dev"])), ("test", list(rows["test"]))):
        if split != "train":
            items = [{"audio_filepath": r["audio_path"], "text": r["text"], "speaker": r["speaker"]} for r in items]
        (root / f"{split}.jsonl").write_text(
            "\n".join(json.dumps(i, ensure_ascii=False) for i in items) + "\n", encoding="utf-8"
        )
    return root


def _manifest(root: Path, *extra: str):
    return compose_cfg(
        "dataset=manifest",
        *[f"dataset.{s}={root / f'{s}.jsonl'}" for s in ("train", "dev", "test")],
        f"paths.cache_dir={SESSION_DIR / 'cache'}",
        *extra,
    )


def test_every_bad_file_gets_its_reason(bad_corpus, tmp_path):
    cfg = _manifest(bad_corpus, "audit.max_bad_fraction=0.5")
    splits = normalize_splits(load_splits(cfg.dataset), cfg.dataset.text)
    processor = build_processor(
        build_vocab(splits["train"]["text"]), load_feature_extractor(cfg.model), tmp_path / "model"
    )
    features = extract_features(splits, processor, cfg.dataset, Path(cfg.paths.cache_dir) / "features")
    clean, report = run_audit(features, cfg.audit, shape_config(cfg.model), tmp_path / "data_audit.json")
    reasons = {Path(f["path"]).name: f["reason"] for f in report["files"]}
    assert reasons == {name: reason for name, reason in EXPECTED.items() if reason}
    assert report["quarantined"] == 10 and report["by_reason"]["unreadable"] == 4
    assert len(clean["train"]) == 30 + 2 and len(clean["dev"]) == 5  # stereo 44.1 kHz is resampled, not rejected
    stereo = clean["train"].filter(lambda row: row["audio_path"].endswith("stereo44k.wav"))[0]
    assert stereo["duration"] == pytest.approx(len(sf.read(bad_corpus / "good_copy.flac")[0]) / 16000, abs=0.01)
    assert json.loads((tmp_path / "data_audit.json").read_text())["by_split"]["train"] == {
        "rows": 42,
        "quarantined": 10,
    }

    with pytest.raises(DataError, match="10 of 42 train utterances were quarantined.*max_bad_fraction=0.05"):
        run_audit(features, _manifest(bad_corpus).audit, shape_config(cfg.model), tmp_path / "again.json")
    assert (tmp_path / "again.json").is_file()  # the report is written before stopping


@pytest.mark.fast
def test_ctc_infeasible_uses_the_models_own_frame_count():
    cfg = compose_cfg()
    config = shape_config(cfg.model)
    config.vocab_size = 10
    model = Wav2Vec2BertForCTC(config)
    for frames in (1, 2, 3, 10, 101, 250):
        assert output_frames(config, frames) == int(model._get_feat_extract_output_lengths(frames))


def test_training_on_a_corpus_with_corrupt_files_has_finite_loss(bad_corpus, tmp_path):
    cfg = _manifest(
        bad_corpus,
        "audit.max_bad_fraction=0.5",
        "trainer.max_steps=8",
        "trainer.eval_steps=4",
        "trainer.logging_steps=1",
        "tracking.enabled=false",
    )
    metrics = pipeline.run(cfg, tmp_path)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    report = json.loads((tmp_path / "data_audit.json").read_text())
    assert report["quarantined"] == 10 and metrics["train_utterances"] == 32


def test_missing_file_is_quarantined(tmp_path):
    """Loaders that index audio up front (Hub paths, a deleted file after loading) meet the audit's missing_file."""
    from datasets import Dataset, DatasetDict

    cfg = compose_cfg(*TINY)
    rows = load_splits(cfg.dataset)
    splits = DatasetDict({name: split for name, split in rows.items()})
    gone = dict(splits["dev"][0], id="gone", audio_path=str(tmp_path / "gone.flac"))
    splits["dev"] = Dataset.from_list([*splits["dev"], gone])
    splits = normalize_splits(splits, cfg.dataset.text)
    processor = build_processor(
        build_vocab(splits["train"]["text"]), load_feature_extractor(cfg.model), tmp_path / "model"
    )
    features = extract_features(splits, processor, cfg.dataset, tmp_path / "cache")
    clean, report = run_audit(features, cfg.audit, shape_config(cfg.model), tmp_path / "audit.json")
    assert report["files"] == [
        {
            "split": "dev",
            "id": "gone",
            "path": str(tmp_path / "gone.flac"),
            "reason": "missing_file",
            "detail": f"{tmp_path / 'gone.flac'} does not exist",
        }
    ]
    assert len(clean["dev"]) == 5
