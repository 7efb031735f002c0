"""A user's mistake ends in one line on stderr naming the fix (exit 1; 2 for a bad command line),
never in a traceback; and the CPU thread policy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from asr.paths import REPO_DIR
from asr.threads import CpuShare, apply_policy, threads_for
from asr.tracking import tracking_uri


def run(*args: str, cwd=REPO_DIR, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, (
        result.stderr
    )
    assert not [line for line in lines if "Error executing job" in line], result.stderr
    return errors[0]


OUT = "hydra.run.dir={out}"


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        ([str(REPO_DIR / "train.py"), "trainer.epoch=3", OUT], 2, "Could not override 'trainer.epoch'"),
        ([str(REPO_DIR / "sweep.py"), "trainer.lr=1e-3", "sweep.dir={out}"], 1, "trainer.lr is searched by the study"),
        (["-m", "asr.evaluate", OUT], 1, "nothing to evaluate. Fix: run_dir="),
        (["-m", "asr.evaluate", "run_dir=/nonexistent/run", OUT], 1, "/nonexistent/run is not a finished training run"),
        (["-m", "asr.transcribe", "/nonexistent/model", "x.flac"], 1, "/nonexistent/model is not a saved model"),
        (
            ["-m", "asr.audit", "dataset=manifest", "dataset.train=/nonexistent/train.jsonl", OUT],
            1,
            "/nonexistent/train.jsonl does not exist",
        ),
    ],
)
def test_user_mistakes_end_in_one_line(args, status, says, tmp_path):
    result = run(*(a.format(out=tmp_path) for a in args), cwd=tmp_path)
    assert result.returncode == status, result.stderr[-2000:]
    assert says in one_error_line(result)


def test_compare_on_an_empty_store_says_how_to_make_a_sweep(tmp_path):
    result = run("-m", "asr.compare", "--uri", f"sqlite:///{tmp_path / 'empty.db'}")
    assert result.returncode == 1 and "no sweep found" in one_error_line(result)


def test_a_failed_run_carries_the_same_message_in_mlflow(tmp_path):
    result = run(
        str(REPO_DIR / "train.py"),
        "dataset=openslr54",
        f"dataset.root={tmp_path / 'nowhere'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "tracking.experiment=errors-as-typed",
        cwd=tmp_path,
    )
    line = one_error_line(result)
    assert result.returncode == 1 and "does not exist" in line and "openslr.org/54" in line
    client = MlflowClient(tracking_uri())
    run_ = client.search_runs([client.get_experiment_by_name("errors-as-typed").experiment_id])[0]
    assert run_.info.status == "FAILED" and "error: " + " ".join(run_.data.tags["error"].split()) == line


def test_hydra_full_error_shows_the_traceback(tmp_path):
    result = run("-m", "asr.evaluate", f"hydra.run.dir={tmp_path}", cwd=tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert (
        result.returncode == 1 and "Traceback" in result.stderr and "ConfigError: nothing to evaluate" in result.stderr
    )


def test_slurm_cpus_become_the_thread_count_unless_the_user_chose():
    env = {"SLURM_CPUS_PER_TASK": "4"}
    apply_policy(env)
    assert env["OMP_NUM_THREADS"] == "4"
    env = {"SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "2"}
    apply_policy(env)
    assert env["OMP_NUM_THREADS"] == "2"
    env = {}
    apply_policy(env)
    assert env == {}


def test_the_governor_leaves_other_processes_their_cores():
    """A busy neighbour on one of 2 cores → 1 thread; gone → 2 again (asr.threads, asr.trainer.ThreadGovernor)."""
    assert threads_for(2, others=1.0) == 1 and threads_for(2, others=0.05) == 2 and threads_for(2, others=1.9) == 1
    assert threads_for(16, others=3.2) == 13
    share = CpuShare()
    neighbour = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(2.0)
        busy = share.others()
    finally:
        neighbour.wait()
    assert busy is not None and 0.6 < busy < 1.6  # one core's worth of someone else's work
