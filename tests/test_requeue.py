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


def _job_pid(sweep_dir: Path, job_dir: Path | None = None) -> int | None:
    """The training process of a job of the grid (submitit runs it as `python -m submitit.core._submit
    <folder>`); `job_dir`: the one whose run writes there (its open files)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and str(sweep_dir) in cmdline:
            if job_dir is None or _writes_in(proc, job_dir):
                return int(proc.name)
    return None


def _writes_in(proc: Path, folder: Path) -> bool:
    """The process has a file of `folder` open (its Hydra job log, train.log)."""
    try:
        return any(str(folder) + "/" in os.readlink(fd) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def _child_runs(experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r for r in runs if r.data.tags.get("sweep_role") == "job"]


def _eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    state = json.loads((Path(latest_checkpoint(run_dir / "checkpoints")) / "trainer_state.json").read_text())
    return [(e["step"], e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e]


def test_warning_signal_checkpoints_requeues_and_resumes_the_same_run(tmp_path):
    """USR2 mid-training (SLURM's warning before the time limit): the job saves a checkpoint at the end
    of its step, submitit requeues it, and the next start resumes from that step in the same MLflow
    run. Its result is its uninterrupted twin's (the grid's other job, run alongside): same steps, same
    evaluations, same test WER."""
    from mlflow.tracking import MlflowClient

    sweep_dir = tmp_path / "grid"
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": "requeue-usr2"}
    cmd = [sys.executable, "train.py", "-m", *GRID, "tracking.run_name=twin,requeued", *SMALL_CORPUS,
           f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list((sweep_dir / "1" / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert time.monotonic() < deadline and driver.poll() is None, "the job never saved a checkpoint"
            time.sleep(0.2)
        os.kill(_job_pid(sweep_dir, job_dir=sweep_dir / "1"), signal.SIGUSR2)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]

    log = next(p for p in sweep_dir.glob(".submitit/*/*_0_log.out") if "Checkpoint saved" in p.read_text())
    log = log.read_text()
    saved = int(log.split("Checkpoint saved at step ")[1].split(";")[0])
    assert 50 <= saved < 200 and "Requeued job" in log and "resuming from" in log, log[-3000:]
    assert f"1/checkpoints/checkpoint-{saved}" in log.split("resuming from", 1)[1].splitlines()[0]

    expected = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    got = json.loads((sweep_dir / "1" / "metrics.json").read_text())
    assert got["train_steps"] == expected["train_steps"] == 200
    assert got["test_wer"] == pytest.approx(expected["test_wer"], abs=0.01)
    # one thread per job, data order and RNG restored: the same computation, evaluation by evaluation
    assert [s for s, _ in _eval_curve(sweep_dir / "1")] == [s for s, _ in _eval_curve(sweep_dir / "0")]
    for (step, loss), (_, want) in zip(_eval_curve(sweep_dir / "1"), _eval_curve(sweep_dir / "0")):
        assert loss == pytest.approx(want, rel=1e-4), step

    children = {r.info.run_name: r for r in _child_runs("requeue-usr2")}  # one run per job, no ghost
    assert sorted(children) == ["requeued", "twin"]
    child = children["requeued"]
    assert child.info.status == "FINISHED" and child.data.tags["restarts"] == "1"
    assert "restarts" not in children["twin"].data.tags
    steps = [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 200  # steps go on, none logged twice
    assert child.data.metrics["test_wer"] == pytest.approx(got["test_wer"])


def test_trunk_job_requeued_on_the_warning_signal_resumes_and_keeps_its_fork(tmp_path):
    """A shared trunk's job gets the warning signal mid-stretch: it checkpoints, is requeued, resumes
    from that checkpoint in the trunk's one MLflow run, keeps its fork, and the grid finishes."""
    from mlflow.tracking import MlflowClient

    sweep_dir = tmp_path / "grid"
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": "requeue-trunk"}
    # 16 epochs of 8 steps: the trunk trains 102 steps to the fork, the branch the last 26
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=local_parallel", "trainer.epochs=16",
           "trainer.lr_scheduler=wsd", "hydra/sweeper=branches", "debug=fast", "trainer.max_steps=null",
           "trainer.eval_steps=20", *SMALL_CORPUS, f"hydra.sweep.dir={sweep_dir}",
           f"hydra.sweeper.trunks_dir={tmp_path / 'trunks'}"]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "trunks").glob("*/checkpoints/checkpoint-*/trainer_state.json")):
            assert time.monotonic() < deadline and driver.poll() is None, "the trunk never saved a checkpoint"
            time.sleep(0.2)
        os.kill(_job_pid(sweep_dir), signal.SIGUSR2)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    [trunk] = list((tmp_path / "trunks").iterdir())
    logs = "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.out"))
    saved = int(logs.split("Checkpoint saved at step ")[1].split(";")[0])
    assert 20 <= saved < 102 and f"Trunk: steps {saved} → 102" in logs, logs[-3000:]
    assert (trunk / "forks" / "step-102" / "trainer_state.json").is_file()
    assert json.loads((trunk / "branches" / "16" / "done.json").read_text())["train_steps"] == 128
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("requeue-trunk").experiment_id])
    roles = sorted(r.data.tags.get("branch_role", r.data.tags.get("sweep_role")) for r in runs)
    assert roles == ["branch", "parent", "trunk"] and all(r.info.status == "FINISHED" for r in runs)
