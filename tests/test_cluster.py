"""The cluster path as users type it, on real servers: a one-node SLURM cluster (2 fake GPUs), PostgreSQL
and an MLflow server on PostgreSQL, brought up once per session by asr.devcluster.

Needs root and Debian's slurmctld slurmd slurm-client munge postgresql (CI installs them); elsewhere
these tests skip with one line saying what to install.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import SMALL_CORPUS

from asr.devcluster import LocalCluster, missing
from asr.paths import REPO_DIR

if (UNAVAILABLE := missing()) is not None:  # one line for the whole file, naming the packages to install
    pytest.skip(UNAVAILABLE, allow_module_level=True)

# What a user adds on a small cluster: its partition, and what one job may ask of a 2-core node.
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
]


@pytest.fixture(scope="session")
def cluster() -> dict[str, str]:
    """The environment a user exports after `python -m asr.devcluster up` (plus the test session's own)."""
    base = Path(tempfile.mkdtemp(prefix="asr-cluster-"))
    local = LocalCluster(base)
    atexit.register(local.down)  # also when the session dies before the fixture's teardown
    started = time.monotonic()
    env = local.up()
    print(f"local cluster up in {time.monotonic() - started:.1f} s: {env}")
    yield {**os.environ, **env, "OMP_WAIT_POLICY": "PASSIVE"}
    local.down()
    shutil.rmtree(base, ignore_errors=True)


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def array_tasks(submitit_dir: Path) -> list[Path]:
    """submitit's folder per array task: <array job id>_<task index>."""
    return sorted(p for p in submitit_dir.iterdir() if re.fullmatch(r"\d+_\d+", p.name))


def client(env: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def runs_of(env: dict, experiment: str) -> list:
    mlflow = client(env)
    found = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([found.experiment_id], max_results=100) if found else []


def test_slurm_grid_as_typed(cluster, tmp_path):
    """`python train.py -m hydra/launcher=slurm trainer.epochs=1,2 debug=fast`: two array tasks on the
    fake GPUs, one MLflow parent with two children on the server, summary.csv and the plot."""
    env = {**cluster, "MLFLOW_EXPERIMENT_NAME": "cluster-grid"}
    sweep_dir = tmp_path / "grid"
    started = time.monotonic()
    run(
        [
            sys.executable,
            "train.py",
            "-m",
            *SLURM,
            "trainer.epochs=1,2",
            "debug=fast",
            *SMALL_CORPUS,
            'hydra.launcher.setup=["echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"]',
            f"hydra.sweep.dir={sweep_dir}",
        ],
        env,
    )
    print(f"2-job SLURM grid: {time.monotonic() - started:.1f} s")
    task_dirs = array_tasks(sweep_dir / ".submitit")
    assert [p.name.split("_")[1] for p in task_dirs] == ["0", "1"]  # one job array, two tasks
    gpus = [
        line.split("=")[1]
        for p in task_dirs
        for line in next(p.glob("*_log.out")).read_text().splitlines()
        if line.startswith("CUDA_VISIBLE_DEVICES=")
    ]
    assert len(gpus) == 2 and set(gpus) <= {"0", "1"}, gpus  # each job got one of the node's GPUs from SLURM
    runs = runs_of(env, "cluster-grid")
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["trainer.epochs"] for r in children) == ["1", "2"]
    assert (sweep_dir / "summary.csv").is_file() and list(sweep_dir.glob("*.png"))


def sweep_cmd(study: str, sweep_dir: Path, *extra: str) -> list[str]:
    # debug=fast trials (30 steps) that evaluate and checkpoint every 10 (the cpu_demo study says 100)
    return [
        "sweep.workers=2",
        f"sweep.study_name={study}",
        f"sweep.dir={sweep_dir}",
        "debug=fast",
        "trainer.eval_steps=10",
        *SMALL_CORPUS,
        *extra,
    ]


def test_make_sweep_on_slurm_with_postgresql(cluster, tmp_path):
    """`make sweep LAUNCHER=slurm STORAGE=postgresql+psycopg2://...`: the workers are one job array, the
    study lives in PostgreSQL, trials report to the pruner, all under one MLflow parent run."""
    import optuna

    env = {**cluster, "MLFLOW_EXPERIMENT_NAME": "cluster-sweep"}
    args = " ".join(
        [
            *SLURM[1:],
            *sweep_cmd(
                "cluster_sweep",
                tmp_path / "sweep",
                "sweep.n_trials=4",
                "trainer.max_steps=20",
                "sweep.pruner.n_startup_trials=1",
                "sweep.pruner.warmup_evals=2",
            ),
        ]
    )
    started = time.monotonic()
    run(["make", "sweep", "LAUNCHER=slurm", f"STORAGE={cluster['OPTUNA_STORAGE']}", f"ARGS={args}"], env)
    print(f"4-trial, 2-worker SLURM sweep: {time.monotonic() - started:.1f} s")
    assert len(array_tasks(tmp_path / "sweep" / "submitit")) == 2
    study = optuna.load_study(study_name="cluster_sweep", storage=cluster["OPTUNA_STORAGE"])
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert all(len(t.intermediate_values) >= 2 for t in trials)  # every eval reached the pruner through PostgreSQL
    assert isinstance(study.pruner, optuna.pruners.BasePruner)
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = [r for r in runs_of(env, "cluster-sweep") if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1, 2, 3]


def test_postgresql_url_forms(cluster, tmp_path):
    """The storage URL as the docs print it (bare postgresql:// is psycopg 3 under SQLAlchemy 2) and
    the explicit driver forms all open the study after `make setup`."""
    from asr.sweep.storage import open_storage

    base = cluster["OPTUNA_STORAGE"].split("://", 1)[1]
    env = {**cluster, "MLFLOW_EXPERIMENT_NAME": "cluster-urls"}
    run(
        [
            sys.executable,
            "sweep.py",
            f"sweep.storage=postgresql://{base}",
            "sweep.report_only=true",
            "sweep.study_name=url_form",
            f"sweep.dir={tmp_path}",
            *SMALL_CORPUS,
        ],
        env,
    )
    for scheme in ("postgresql+psycopg", "postgresql+psycopg2"):
        storage = open_storage(
            {
                "storage": f"{scheme}://{base}",
                "dir": str(tmp_path),
                "heartbeat_interval": 20,
                "grace_period": 120,
                "max_retry": 2,
            }
        )
        assert "url_form" in [s.study_name for s in storage.get_all_studies()]


def test_cancelled_job_does_not_hang_the_driver(cluster, tmp_path):
    """Without SLURM accounting sacct answers nothing, so submitit alone would wait forever on a job
    cancelled before it wrote its result; the driver's wait notices it left the queue."""
    import submitit

    from asr.cluster.jobs import JobLostError, wait_all

    os.environ["SLURM_CONF"] = cluster["SLURM_CONF"]  # submitit runs sbatch/squeue in this process
    try:
        executor = submitit.AutoExecutor(folder=str(tmp_path / "%j"), cluster="slurm")
        executor.update_parameters(slurm_partition="debug", cpus_per_task=1, slurm_mem="100M", timeout_min=5)
        done, doomed = executor.submit(sum, [1, 2]), executor.submit(time.sleep, 120)
        while (
            "RUNNING"
            not in subprocess.run(
                ["squeue", "-h", "-j", doomed.job_id, "-o", "%T"], capture_output=True, text=True, env=cluster
            ).stdout
        ):
            time.sleep(0.5)
        subprocess.run(["scancel", doomed.job_id], check=True, env=cluster)
        started = time.monotonic()
        (_, result, error), (_, _, lost) = wait_all([done, doomed], grace_s=3)
        assert result == 3 and error is None
        assert isinstance(lost, JobLostError) and time.monotonic() - started < 30
    finally:
        os.environ.pop("SLURM_CONF")


def test_scancel_worker_mid_trial_then_rerun(cluster, tmp_path):
    """scancel one worker mid-trial: the driver does not hang, the dead trial is re-queued and resumed
    from its checkpoint, the study stops at n_trials; the same command again re-attaches the parent
    run and adds nothing."""
    import optuna

    env = {**cluster, "MLFLOW_EXPERIMENT_NAME": "cluster-scancel"}
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "sweep.py",
        *SLURM,
        f"sweep.storage={cluster['OPTUNA_STORAGE']}",
        *sweep_cmd(
            "cluster_scancel",
            sweep_dir,
            "sweep.n_trials=2",
            "sweep.pruner.name=none",
            "trainer.max_steps=200",  # long enough that scancel lands mid-trial
            "sweep.heartbeat_interval=1",
            "sweep.grace_period=6",
        ),
    ]
    driver = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        # both workers' trials have a complete checkpoint, so the cancelled worker's trial has one to resume from
        while len({p.parents[2] for p in sweep_dir.glob("trial_*/checkpoints/checkpoint-*/trainer_state.json")}) < 2:
            assert time.monotonic() < deadline and driver.poll() is None, "the trials never reached a checkpoint"
            time.sleep(0.5)
        worker0 = array_tasks(sweep_dir / "submitit")[0].name
        subprocess.run(["scancel", worker0], check=True, env=env)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-5000:]
    assert f"worker job {worker0} failed" in out
    study = optuna.load_study(study_name="cluster_scancel", storage=cluster["OPTUNA_STORAGE"])
    trials = study.get_trials()
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 2
    resumed = [t for t in finished if t.user_attrs.get("resumed_from")]
    assert len(resumed) == 1 and resumed[0].system_attrs["retry_history"]
    dead = study.trials[resumed[0].system_attrs["retry_history"][-1]]
    assert dead.state == optuna.trial.TrialState.FAIL and dead.params == resumed[0].params
    parent = study.user_attrs["mlflow_parent_run_id"]

    run(cmd, env)  # the same command again: the study is full; nothing runs twice
    study = optuna.load_study(study_name="cluster_scancel", storage=cluster["OPTUNA_STORAGE"])
    assert len(study.get_trials()) == len(trials)
    assert study.user_attrs["mlflow_parent_run_id"] == parent
    assert "resumed_at" in client(env).get_run(parent).data.tags


def test_grid_job_cancelled_before_its_result_fails_the_sweep(cluster, tmp_path):
    """`train.py -m` with hydra/launcher=slurm: a job cancelled while it starts fails the sweep (exit code,
    error naming the job, parent run closed) instead of leaving the command waiting forever."""
    env = {**cluster, "MLFLOW_EXPERIMENT_NAME": "cluster-grid-cancel"}
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        *SLURM,
        "trainer.epochs=1",
        "debug=fast",
        *SMALL_CORPUS,
        'hydra.launcher.setup=["sleep 120"]',
        f"hydra.sweep.dir={tmp_path / 'grid'}",
    ]
    driver = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while (
            "RUNNING"
            not in subprocess.run(["squeue", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout
        ):
            assert time.monotonic() < deadline and driver.poll() is None, "the grid job never started"
            time.sleep(0.5)
        subprocess.run(["scancel", "--user=root"], check=True, env=env)
        out, _ = driver.communicate(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0 and "ended without a result (CANCELLED)" in out, out[-3000:]
    parents = [r for r in runs_of(env, "cluster-grid-cancel") if r.data.tags.get("sweep_role") == "parent"]
    assert [r.info.status for r in parents] == ["FAILED"]


def _start_requeued_jobs_now(env: dict, stop: threading.Event) -> None:
    """SLURM holds a requeued job ~2 minutes before it may start again (its BeginTime): on this one-node
    cluster, start it at once, so that three allocations fit in a test."""
    while not stop.wait(0.5):
        out = subprocess.run(["squeue", "-h", "-o", "%i|%r"], capture_output=True, text=True, env=env).stdout
        for job_id in [line.split("|")[0] for line in out.split() if line.endswith("|BeginTime")]:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, env=env)


def _grid_job(sweep_dir: Path) -> Path | None:
    jobs = [p for p in (sweep_dir / ".submitit").glob("*") if re.fullmatch(r"\d+(_\d+)?", p.name)]
    return jobs[0] if jobs else None


def _only_child(env: dict, experiment: str):
    runs = runs_of(env, experiment)
    [child] = [r for r in runs if r.data.tags.get("sweep_role") == "job"]
    [parent] = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    return child, parent


def _requeue_grid(env: dict, sweep_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", "-m", *SLURM, "trainer.epochs=1", "debug=fast", *extra, *SMALL_CORPUS,
           f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_job_longer_than_its_time_limit_finishes_in_one_run(cluster, tmp_path):
    """A grid job with a 2-minute time limit and 2-4 allocations of work: each warning (USR2, 30 s before the
    limit; SLURM may send it up to 60 s earlier, so a 1-minute limit could signal a job before Python runs)
    saves a checkpoint and requeues the job, each allocation resumes the same MLflow run, and the grid ends
    with one FINISHED child at its planned step count."""
    env = {**cluster, "MLFLOW_EXPERIMENT_NAME": "cluster-timeout"}
    sweep_dir = tmp_path / "grid"
    extra = ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30", "trainer.max_steps=1200",
             "trainer.eval_steps=100"]  # fmt: skip
    driver, stop = _requeue_grid(env, sweep_dir, *extra), threading.Event()
    threading.Thread(target=_start_requeued_jobs_now, args=(env, stop), daemon=True).start()
    try:
        out, _ = driver.communicate(timeout=480)
    finally:
        stop.set()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-5000:]
    log = next(_grid_job(sweep_dir).glob("*_log.out")).read_text()
    assert "Checkpoint saved at step" in log and "this job is timed-out" in log, log[-3000:]
    child, parent = _only_child(env, "cluster-timeout")
    assert child.info.status == parent.info.status == "FINISHED" and int(child.data.tags["restarts"]) >= 1
    steps = [m.step for m in client(env).get_metric_history(child.info.run_id, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 1200  # the steps go on; none logged twice
    assert json.loads((sweep_dir / "0" / "metrics.json").read_text())["train_steps"] == 1200


def test_job_requeued_and_held_mid_training_resumes_in_one_run(cluster, tmp_path):
    """`scontrol requeue` mid-training (what preemption and node failures do: SIGTERM, no warning): the run
    is closed KILLED, never left RUNNING; held while pending and released, the job resumes from its last
    checkpoint in the same MLflow run, and the grid ends with one FINISHED child."""
    env = {**cluster, "MLFLOW_EXPERIMENT_NAME": "cluster-requeue"}
    sweep_dir = tmp_path / "grid"
    driver, stop = _requeue_grid(env, sweep_dir, "trainer.max_steps=300", "trainer.eval_steps=50"), threading.Event()
    try:
        deadline = time.monotonic() + 120
        while not list((sweep_dir / "0" / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert time.monotonic() < deadline and driver.poll() is None, "the job never saved a checkpoint"
            time.sleep(0.2)
        job = _grid_job(sweep_dir).name
        subprocess.run(["scontrol", "requeue", job], check=True, env=env)
        while "PENDING" not in subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                              text=True, env=env).stdout:  # fmt: skip
            time.sleep(0.2)
        child, _ = _only_child(env, "cluster-requeue")
        assert child.info.status == "KILLED"  # SIGTERM under submitit: closed, not a ghost RUNNING run
        subprocess.run(["scontrol", "hold", job], check=True, env=env)
        time.sleep(3)
        assert driver.poll() is None  # a held job is waited for
        subprocess.run(["scontrol", "release", job], check=True, env=env)
        threading.Thread(target=_start_requeued_jobs_now, args=(env, stop), daemon=True).start()
        out, _ = driver.communicate(timeout=300)
    finally:
        stop.set()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-5000:]
    log = next(_grid_job(sweep_dir).glob("*_log.out")).read_text()
    assert "resuming from" in log and "checkpoint-" in log.split("resuming from", 1)[1].splitlines()[0], log[-3000:]
    child, parent = _only_child(env, "cluster-requeue")
    assert child.info.status == parent.info.status == "FINISHED" and child.data.tags["restarts"] == "1"
    assert json.loads((sweep_dir / "0" / "metrics.json").read_text())["train_steps"] == 300


def test_wait_sees_late_results_job_errors_and_multi_task_jobs(cluster, tmp_path):
    """Result files that a shared filesystem shows 20 s late (NFS caches attributes for 30-60 s) are
    still found; a failed job reports its own exception, not just FAILED; a job of 2 tasks returns its
    first task's result."""
    import submitit

    from asr.cluster.jobs import wait_all

    os.environ["SLURM_CONF"] = cluster["SLURM_CONF"]
    try:
        executor = submitit.AutoExecutor(folder=str(tmp_path / "%j"), cluster="slurm")
        executor.update_parameters(slurm_partition="debug", cpus_per_task=1, slurm_mem="100M", timeout_min=5)
        late, failed = executor.submit(sum, [1, 2]), executor.submit(int, "the job's own words")  # ValueError
        executor.update_parameters(tasks_per_node=2)
        two_tasks = executor.submit(sum, [3, 4])
        hidden: dict[Path, Path] = {}
        stop = threading.Event()

        def hide_new_results() -> None:  # what a client with a stale attribute cache sees
            while not stop.wait(0.01):
                for job in (late, failed):
                    if job.paths.result_pickle.exists():
                        hidden[job.paths.result_pickle] = job.paths.result_pickle.rename(
                            tmp_path / f"hidden-{job.job_id}"
                        )

        threading.Thread(target=hide_new_results, daemon=True).start()
        threading.Timer(25, lambda: (stop.set(), [h.rename(r) for r, h in hidden.items()])).start()
        outcomes = wait_all([late, failed, two_tasks], poll_s=5, queue_poll_s=1)
    finally:
        os.environ.pop("SLURM_CONF")
    assert len(hidden) == 2  # both results really were out of sight for 25 s
    (_, result, error), (_, _, job_error), (_, multi, multi_error) = outcomes
    assert result == 3 and error is None
    assert "the job's own words" in str(job_error) and "ValueError" in str(job_error)
    assert multi == 7 and multi_error is None
