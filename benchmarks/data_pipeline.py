"""Throughput of the data pipeline: decode + features + audit, cold and from the feature cache.

    .venv/bin/python benchmarks/data_pipeline.py [Hydra overrides, e.g. dataset=openslr54 dataset.root=...]

Prints audio seconds processed per wall-clock second ("x real time") for the first run, which
decodes every file once (the audit's decode pass is this pass) and extracts features, and for a
second run that finds the features cached, plus the ratio between them. Default: the built-in
corpus (1,700 utterances), with a fresh feature cache so the first run is really cold.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import asr  # noqa: F401
from asr.audit import run_audit
from asr.data import load_splits
from asr.model import shape_config
from asr.paths import REPO_DIR
from asr.prepare import features_for, load_normalised, new_processor


def timed_pass(cfg, processor, cache_dir: Path, out_dir: Path) -> tuple[float, float, float, int]:
    splits = load_normalised(cfg.dataset)
    started = time.perf_counter()
    features = features_for(splits, processor, cfg.dataset, cache_dir)
    extracted = time.perf_counter()
    _, report = run_audit(features, cfg.audit, shape_config(cfg.model), out_dir / "data_audit.json")
    audited = time.perf_counter()
    seconds = sum(sum(features[s]["duration"]) for s in features)
    return seconds, extracted - started, audited - extracted, report["quarantined"]


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load_splits(cfg.dataset)  # generate/locate the corpus first: not part of the measurement
        processor = new_processor(cfg, load_normalised(cfg.dataset), tmp / "model")
        audio_s, cold, audit_cold, bad = timed_pass(cfg, processor, tmp / "cache", tmp)
        _, warm, audit_warm, _ = timed_pass(cfg, processor, tmp / "cache", tmp)
    print(
        f"dataset {cfg.dataset.name}: {audio_s / 3600:.2f} h of audio, {bad} quarantined, "
        f"num_proc={cfg.dataset.num_proc}"
    )
    print(f"cold: decode + features {cold:.1f} s ({audio_s / cold:.0f}x real time), audit {audit_cold:.2f} s")
    print(f"warm (features cached): {warm:.2f} s ({audio_s / warm:.0f}x real time), audit {audit_warm:.2f} s")
    print(f"ratio cold/warm: {cold / warm:.0f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
