"""`train.py -m`: one MLflow parent per sweep, a child per job, summary + plot, failures, servers.

Real clients only: a real `mlflow server` on 127.0.0.1 (started once per session) and real
subprocesses, including submitit's local launcher (jobs in separate processes).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time

import helpers
import pytest
from conftest import SESSION_DIR, SMALL_CORPUS, compose_cfg
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from asr import sweep_summary
from asr.tracking import MlflowRun, TrackingUnavailableError

FAST_GRID = ["debug=fast", "trainer.max_steps=null", *SMALL_CORPUS]


@pytest.fixture(scope="session")
def mlflow_server():
    """A real tracking server with an SQLite backend, as users run one for a cluster."""
    with helpers.mlflow_server(SESSION_DIR / "server") as uri:
        yield uri


def _train(*args: str, uri: str | None = None) -> subprocess.CompletedProcess:
    return helpers.train_py(*args, env={"MLFLOW_TRACKING_URI": uri} if uri else None)


def _sweep(client: MlflowClient, experiment: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([experiment_id], "tags.sweep_role = 'parent'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, sorted(children, key=lambda run: int(run.data.tags["job_num"]))


def _summary(client: MlflowClient, parent) -> list[dict]:
    path = client.download_artifacts(
        parent.info.run_id, "summary.csv", str(SESSION_DIR / "downloads" / parent.info.run_id)
    )
    return list(csv.DictReader(open(path)))


@pytest.mark.slow  # the README's grid on the SQLite store runs as typed in tests/test_readme.py
def test_epoch_grid_on_the_sqlite_store(tmp_path):
    """Basic launcher, default-style SQLite store; `trainer.epochs` means what it says."""
    result = _train(
        "-m", "trainer.epochs=1,2", *FAST_GRID, "tracking.experiment=grid-sqlite", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]

    steps = {}
    for job in ("0", "1"):
        config = OmegaConf.load(tmp_path / job / ".hydra" / "config.yaml")
        assert (tmp_path / job / "model" / "config.json").is_file()
        steps[config.trainer.epochs] = json.loads((tmp_path / job / "metrics.json").read_text())["train_steps"]
    assert steps == {1: 8, 2: 16}  # 64 utterances / batch 8 = 8 steps per epoch

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent, children = _sweep(client, "grid-sqlite")
    assert parent.info.status == "FINISHED"
    assert [c.data.params["trainer.epochs"] for c in children] == ["1", "2"]
    assert [c.info.run_name.split()[0] for c in children] == ["trainer.epochs=1", "trainer.epochs=2"]
    assert [len(client.get_metric_history(c.info.run_id, "eval_wer")) for c in children] == [
        1,
        2,
    ]  # eval at steps 8 | 10, 16
    assert {"summary.csv", "wer_vs_trainer.epochs.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert (tmp_path / "summary.csv").is_file()


@pytest.mark.slow  # the SLURM grid on a real MLflow server (tests/test_cluster.py) runs in the default suite
def test_parallel_grid_on_a_tracking_server(mlflow_server, tmp_path, capsys):
    result = _train(
        "-m",
        "hydra/launcher=local_parallel",
        "trainer.epochs=1,2",
        *FAST_GRID,
        "tracking.experiment=grid-server",
        f"hydra.sweep.dir={tmp_path}",
        uri=mlflow_server,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    parent, children = _sweep(client, "grid-server")
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("trainer.epochs=1,2 @ ")
    assert [c.data.params["swept.trainer.epochs"] for c in children] == ["1", "2"]
    assert [c.data.tags["sweep_id"] for c in children] == [parent.info.run_id] * 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "eval_wer")) >= 1

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "wer_vs_trainer.epochs.png"} <= artifacts
    rows = _summary(client, parent)
    assert sorted(row["trainer.epochs"] for row in rows) == ["1", "2"]
    assert {row["status"] for row in rows} == {"FINISHED"}
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    assert parent.data.metrics["best_eval_wer"] == min(float(row["best_eval_wer"]) for row in rows)

    assert sweep_summary.main(["--uri", mlflow_server, "latest"]) == 0
    printed = capsys.readouterr().out
    assert parent.info.run_id in printed and printed.count("FINISHED") == 3  # parent + 2 jobs
    assert "A = best job" in printed and "runner-up job" in printed and "test split: " in printed  # paired bootstrap


def test_failed_job_does_not_stop_the_grid(tmp_path):
    """Basic launcher, SQLite store: job 0 fails, job 1 still runs, the exit code and log name job 0."""
    result = _train(
        "-m",
        "trainer.precision=fp8,fp32",
        *FAST_GRID,
        "tracking.experiment=grid-failure",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "1 of 2 jobs did not finish" in output and "job 0 (trainer.precision=fp8" in output

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent, children = _sweep(client, "grid-failure")
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children] == ["FAILED", "FINISHED"]
    assert "fp8" in children[0].data.tags["error"]
    rows = {row["trainer.precision"]: row for row in _summary(client, parent)}
    assert rows["fp8"]["status"] == "FAILED" and rows["fp32"]["status"] == "FINISHED"
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "wer_vs_trainer.precision.png").is_file()
    assert (tmp_path / "1" / "metrics.json").is_file()


def test_grid_over_a_missing_key_fails_before_any_job(tmp_path):
    result = _train(
        "-m", "trainer.epochz=1,2", *FAST_GRID, "tracking.experiment=grid-typo", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode != 0 and "epochz" in result.stderr
    assert not (tmp_path / "0").exists()
    assert MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_experiment_by_name("grid-typo") is None


def test_unreachable_tracking_server_is_one_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{helpers.free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=uri):
        MlflowRun(compose_cfg(f"tracking.uri={uri}").tracking, "run", {})
    assert time.monotonic() - started < 10
    result = _train("-m", "trainer.epochs=1,2", *FAST_GRID, f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode != 0 and "is not reachable" in result.stderr and "tracking.enabled=false" in result.stderr
    assert not (tmp_path / "0").exists()
