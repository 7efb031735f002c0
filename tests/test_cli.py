"""train.py as users run it: a Hydra multirun grid in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from asr.paths import REPO_DIR
from conftest import SESSION_DIR, SMALL_CORPUS


def test_multirun_epoch_grid_means_what_it_says(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "train.py", "-m", "trainer.epochs=1,2", "debug=fast", "trainer.max_steps=null",
        *SMALL_CORPUS, "tracking.experiment=test-cli", f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    steps = {}
    for job in ("0", "1"):
        config = OmegaConf.load(sweep_dir / job / ".hydra" / "config.yaml")
        metrics = json.loads((sweep_dir / job / "metrics.json").read_text())
        assert (sweep_dir / job / "model" / "config.json").is_file()
        steps[config.trainer.epochs] = metrics["train_steps"]
    assert steps == {1: 8, 2: 16}  # 64 utterances / batch 8 = 8 steps per epoch

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("test-cli").experiment_id])
    assert sorted(run.data.params["trainer.epochs"] for run in runs) == ["1", "2"]
    assert {run.info.run_name.split()[0] for run in runs} == {"trainer.epochs=1", "trainer.epochs=2"}
    assert str(SESSION_DIR) in os.environ["MLFLOW_TRACKING_URI"]
