"""The Hub/parquet loader on a local parquet dataset saved by the test (no network)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SESSION_DIR, compose_cfg

from asr.data import DataError, load_splits
from asr.data.audio import load_audio

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`

TINY = [
    "dataset.sizes.train=30",
    "dataset.sizes.dev=5",
    "dataset.sizes.test=5",
    f"dataset.cache_dir={SESSION_DIR / 'corpus'}",
]
# What a Hub parquet file carries: the column types, and datasets' feature metadata marking `audio` as Audio.
SCHEMA = pa.schema(
    [
        ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("sentence", pa.string()),
        ("client_id", pa.string()),
    ],
    metadata={
        "huggingface": json.dumps(
            {
                "info": {
                    "features": {
                        "audio": {"_type": "Audio"},
                        "sentence": {"dtype": "string", "_type": "Value"},
                        "client_id": {"dtype": "string", "_type": "Value"},
                    }
                }
            }
        )
    },
)


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory):
    """Common Voice-like columns (audio bytes embedded, sentence, client_id), train and test files."""
    corpus = load_splits(compose_cfg(*TINY).dataset)
    folder = tmp_path_factory.mktemp("parquet")
    files = {}
    for split in ("train", "test"):
        rows = list(corpus[split])
        table = {
            "audio": [{"bytes": open(r["audio_path"], "rb").read(), "path": f"{r['id']}.flac"} for r in rows],
            "sentence": [r["text"] for r in rows],
            "client_id": [f"client{i % 10}" for i, _ in enumerate(rows)],
        }
        files[split] = folder / f"{split}.parquet"
        pq.write_table(pa.Table.from_pydict(table, schema=SCHEMA), files[split])
    return files, corpus


def _cfg(files, tmp_path, *extra):
    return compose_cfg(
        "dataset=hf_hub",
        "dataset.path=parquet",
        f"dataset.data_files={{train: {files['train']}, test: {files['test']}}}",
        "dataset.splits.dev=null",
        "dataset.text_column=sentence",
        "dataset.speaker_column=client_id",
        "dataset.dev_fraction=0.3",
        f"dataset.cache_dir={tmp_path}",
        *extra,
    ).dataset


def test_parquet_dataset_loads_with_embedded_audio(parquet_files, tmp_path):
    files, corpus = parquet_files
    splits = load_splits(_cfg(files, tmp_path))
    assert len(splits["train"]) + len(splits["dev"]) == 30 and len(splits["test"]) == 5
    assert not set(splits["train"]["speaker"]) & set(splits["dev"]["speaker"])  # dev carved by speaker
    assert splits["test"]["text"] == corpus["test"]["text"]
    decoded = load_audio(splits["test"][0]["audio_path"], 16000)
    assert np.array_equal(decoded, load_audio(corpus["test"][0]["audio_path"], 16000))

    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.flac")}
    assert len(written) == 35
    load_splits(_cfg(files, tmp_path))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.flac")} == written  # extracted once


def test_missing_column_lists_the_columns(parquet_files, tmp_path):
    files, _ = parquet_files
    with pytest.raises(DataError, match=r"no column\(s\) \['transcript'\].*sentence"):
        load_splits(_cfg(files, tmp_path, "dataset.text_column=transcript"))


def test_unreachable_hub_dataset_names_the_fix(tmp_path):
    cfg = compose_cfg(
        "dataset=hf_hub", "dataset.path=someone/no-such-nepali-dataset", f"dataset.cache_dir={tmp_path}"
    ).dataset
    with pytest.raises(DataError, match="could not load split 'train'.*parquet"):
        load_splits(cfg)
