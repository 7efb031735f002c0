"""torchrun: two CPU processes (gloo) train one run with DDP, layerdrop on, batches by seconds (~40 s)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_CORPUS
from mlflow.tracking import MlflowClient

from asr.paths import REPO_DIR
from asr.tracking import tracking_uri


def test_torchrun_two_processes_with_layerdrop(tmp_path):
    run_dir = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    command = [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        str(REPO_DIR / "train.py"),
        *SMALL_CORPUS,
        "debug=fast",
        "trainer.max_steps=null",
        "trainer.epochs=2",
        "trainer.batch_seconds=12",
        "trainer.pad_to_multiple_of=25",
        "regularization.layerdrop=0.5",  # half the encoder layers skipped per step, differently on each rank
        "tracking.experiment=test-ddp",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "it/s]" not in line)[-6000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    # both ranks together saw each of the 64 utterances once per epoch (summed over ranks at the end)
    assert metrics["train_real_audio_seconds"] == pytest.approx(2 * metrics["train_audio_seconds"], abs=2 * 64 * 0.02)
    assert metrics["train_padded_audio_seconds"] <= 12 * 2 * metrics["train_steps"]  # each rank's batch within the cap
    assert metrics["test_wer"] <= 1.0 and (run_dir / "model" / "model.safetensors").exists()
    predictions = (run_dir / "predictions_test.jsonl").read_text().splitlines()
    assert len(predictions) == 16  # the test split once, not once per rank

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("test-ddp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # only rank 0 records
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train_real_audio_seconds"] == pytest.approx(metrics["train_real_audio_seconds"])
