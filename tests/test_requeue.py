"""A job stopped before its training ends finishes in its next allocation (asr/requeue.py).

The signals are the ones SLURM and submitit send: USR2 before the time limit (or on preemption),
SIGTERM for scancel and `scontrol requeue`. Here they are sent to a job of `hydra/launcher=local_parallel`
(submitit's local executor, which requeues like SLURM); tests/test_cluster.py does the same on SLURM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_CORPUS

from asr.paths import REPO_DIR
from asr.requeue import latest_checkpoint

# 200 steps on the debug corpus, evaluated and checkpointed every 50
GRID = [
    "hydra/launcher=local_parallel",
    "trainer.epochs=1",
    "debug=fast",
    "trainer.max_steps=200",
    "trainer.eval_steps=50",
]


def test_latest_checkpoint_skips_and_drops_an_interrupted_save(tmp_path):
    for step, complete in ((50, True), (100, True), (150, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-150" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-100")
    assert (tmp_path / "checkpoint-150").exists()  # only looked at
    assert latest_checkpoint(tmp_path, drop_incomplete=True) == str(tmp_path / "checkpoint-100")
    assert not (tmp_path / "checkpoint-150").exists() and (tmp_path / "checkpoint-50").exists()


def _job_pid(sweep_dir: Path) -> int | None:
    """The training process of the grid's job (submitit runs it as `python -m submitit.core._submit <folder>`)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and str(sweep_dir) in cmdline:
            return int(proc.name)
    return None


def _grid(sweep_dir: Path, env: dict, signum: int | None = None) -> subprocess.CompletedProcess:
    """The grid as a user types it; with `signum`, sent to its job once it saved its first checkpoint."""
    cmd = [sys.executable, "train.py", "-m", *GRID, *SMALL_CORPUS, f"hydra.sweep.dir={sweep_dir}"]
    driver = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if signum is not None:
            deadline = time.monotonic() + 240
            while not list((sweep_dir / "0" / "checkpoints").glob("checkpoint-*/trainer_state.json")):
                assert time.monotonic() < deadline and driver.poll() is None, "the job never saved a checkpoint"
                time.sleep(0.2)
            os.kill(_job_pid(sweep_dir), signum)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    return subprocess.CompletedProcess(cmd, driver.returncode, out)


def _child_runs(experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r for r in runs if r.data.tags.get("sweep_role") == "job"]


def _eval_curve(sweep_dir: Path) -> list[tuple[int, float]]:
    state = json.loads((Path(latest_checkpoint(sweep_dir / "0" / "checkpoints")) / "trainer_state.json").read_text())
    return [(e["step"], e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e]


def test_warning_signal_checkpoints_requeues_and_resumes_the_same_run(tmp_path):
    """USR2 mid-training (SLURM's warning before the time limit): the job saves a checkpoint at the end
    of its step, submitit requeues it, and the next start resumes from that step in the same MLflow
    run. The result is the uninterrupted run's: same steps, same evaluations, same test WER."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": "requeue-usr2"}
    plain = _grid(tmp_path / "plain", {**env, "MLFLOW_EXPERIMENT_NAME": "requeue-none"})
    assert plain.returncode == 0, plain.stdout[-3000:]
    requeued = _grid(tmp_path / "requeued", env, signal.SIGUSR2)
    assert requeued.returncode == 0, requeued.stdout[-3000:]

    log = next((tmp_path / "requeued" / ".submitit").glob("*/*_0_log.out")).read_text()
    saved = int(log.split("Checkpoint saved at step ")[1].split(";")[0])
    assert 50 <= saved < 200 and "Requeued job" in log and "resuming from" in log, log[-3000:]
    assert f"checkpoint-{saved}" in log.split("resuming from", 1)[1].splitlines()[0]

    expected = json.loads((tmp_path / "plain" / "0" / "metrics.json").read_text())
    got = json.loads((tmp_path / "requeued" / "0" / "metrics.json").read_text())
    assert got["train_steps"] == expected["train_steps"] == 200
    assert got["test_wer"] == pytest.approx(expected["test_wer"], abs=0.01)
    # one thread per job, data order and RNG restored: the same computation, evaluation by evaluation
    assert [s for s, _ in _eval_curve(tmp_path / "requeued")] == [s for s, _ in _eval_curve(tmp_path / "plain")]
    for (step, loss), (_, want) in zip(_eval_curve(tmp_path / "requeued"), _eval_curve(tmp_path / "plain")):
        assert loss == pytest.approx(want, rel=1e-4), step

    [child] = _child_runs("requeue-usr2")  # one run for both allocations, no ghost
    assert child.info.status == "FINISHED" and child.data.tags["restarts"] == "1"
    history = MlflowClient().get_metric_history(child.info.run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)) and max(steps) == 200  # steps go on, none logged twice
    assert child.data.metrics["test_wer"] == pytest.approx(got["test_wer"])


def test_sigterm_closes_the_run_killed_under_submitit(tmp_path):
    """scancel / the time limit's kill send SIGTERM, which submitit ignores: the run must not stay RUNNING."""
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": "requeue-sigterm"}
    result = _grid(tmp_path / "grid", env, signal.SIGTERM)
    assert result.returncode != 0
    [child] = _child_runs("requeue-sigterm")
    assert child.info.status == "KILLED"


def test_sweep_worker_requeued_on_the_warning_signal_resumes_its_trial(tmp_path):
    """A study's worker as a submitit job gets the warning signal mid-trial: the trial saves a checkpoint,
    submitit requeues the worker, and the requeued worker runs the trial again from that checkpoint;
    the study ends with its one trial COMPLETE, the interrupted trial's MLflow run KILLED, not RUNNING."""
    import optuna
    from mlflow.tracking import MlflowClient

    sweep_dir = tmp_path / "study"
    cmd = [
        sys.executable,
        "sweep.py",
        "hydra/launcher=local_parallel",
        "sweep.workers=1",
        "sweep.n_trials=1",
        "sweep.pruner.name=none",
        "sweep.study_name=requeued_worker",
        f"sweep.dir={sweep_dir}",
        "tracking.experiment=requeue-worker",
        "debug=fast",
        "trainer.max_steps=200",
        "trainer.eval_steps=50",
        *SMALL_CORPUS,
    ]
    driver = subprocess.Popen(cmd, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(sweep_dir.glob("trial_0000/checkpoints/checkpoint-*/trainer_state.json")):
            assert time.monotonic() < deadline and driver.poll() is None, "the trial never saved a checkpoint"
            time.sleep(0.2)
        os.kill(_job_pid(sweep_dir), signal.SIGUSR2)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name="requeued_worker", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    first, retry = study.trials
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"]
    assert retry.state.name == "COMPLETE" and retry.system_attrs["retry_history"] == [0]
    saved = json.loads((Path(retry.user_attrs["resumed_from"]) / "trainer_state.json").read_text())["global_step"]
    assert 50 <= saved < 200 and retry.user_attrs["metrics"]["train_steps"] == 200
    client = MlflowClient()
    assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).info.status == "FINISHED"
