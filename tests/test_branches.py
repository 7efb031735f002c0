"""Epoch grids that share one WSD trunk (`hydra/sweeper=branches`), run as users type them.

A branch must be the same computation as an independent WSD run of its length (same weights at
the end), the grid must cost fewer optimizer steps than independent runs, MLflow must show the
trunk and the branches as children of the grid, and a rerun must resume instead of starting over.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import helpers
import pytest
import torch
from conftest import SESSION_DIR, SMALL_CORPUS
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from transformers import TrainingArguments

from asr import branches
from asr.errors import ConfigError
from asr.paths import REPO_DIR
from asr.trainer import CTCTrainer

GRID = ["trainer.epochs=1,2", "trainer.lr_scheduler=wsd", "hydra/sweeper=branches"]
SIZE = ["debug=fast", "trainer.max_steps=null", *SMALL_CORPUS]  # debug=fast caps steps; a branch grid runs epochs


def _train(*args: str, cwd: Path = REPO_DIR) -> subprocess.CompletedProcess:
    """train.py with `cwd`'s own MLflow store (the default store is the repository's mlflow.db)."""
    return helpers.train_py(*args, cwd=cwd, env={"MLFLOW_TRACKING_URI": f"sqlite:///{Path(cwd) / 'mlflow.db'}"})


def _lr_curve(fraction: float, shape: str, total: int, warmup: int, hold: bool = False) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    args = TrainingArguments(output_dir=str(SESSION_DIR / "wsd"), warmup_steps=warmup, report_to="none", use_cpu=True)
    fake = SimpleNamespace(
        wsd={"cooldown_fraction": fraction, "shape": shape, "hold": hold},
        lr_scheduler=None,
        args=args,
        optimizer=optimizer,
    )
    scheduler = CTCTrainer.create_scheduler(fake, total, optimizer)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.fast
def test_wsd_schedule_warms_up_holds_then_cools_down():
    rates = _lr_curve(0.2, "1-sqrt", total=100, warmup=10)
    assert rates[0] == 0 and rates[5] == pytest.approx(0.5)  # linear warm-up
    assert all(r == 1.0 for r in rates[10:80])  # constant until the last 20%
    assert rates[80] == 1.0 and rates[81] < 1.0 and rates[99] < 0.25  # then down towards 0
    assert rates[90] == pytest.approx(1 - math.sqrt(0.5))  # 1-sqrt shape: half-way through, 1 - sqrt(0.5)
    linear = _lr_curve(0.2, "linear", total=100, warmup=10)
    assert linear[90] == pytest.approx(0.5)
    held = _lr_curve(0.2, "1-sqrt", total=100, warmup=10, hold=True)  # a trunk: never decays
    assert all(r == 1.0 for r in held[10:])


@pytest.mark.fast
def test_fork_steps_and_checks():
    assert branches.fork_step(376, 0.2) == 376 - 75
    assert branches.fork_step(8, 0.2) == 6 and branches.fork_step(1, 0.2) == 0
    with pytest.raises(ConfigError, match="cooldown_fraction"):
        branches.decay_steps(100, 0.0)
    cfg = OmegaConf.create(
        {
            "trainer": {
                "lr_scheduler": "wsd",
                "max_steps": None,
                "warmup_steps": None,
                "warmup_ratio": 0.1,
                "cooldown_fraction": 0.2,
            }
        }
    )
    with pytest.raises(ConfigError, match="trainer.warmup_steps"):
        branches.check_settings(cfg)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["trainer.max_steps=null", "trainer.lr_scheduler=cosine"], "Fix: add trainer.lr_scheduler=wsd"),
        (["trainer.lr_scheduler=wsd"], "Fix: add trainer.max_steps=null"),  # debug=fast caps steps at 30
    ],
)
def test_grid_settings_that_cannot_share_a_trunk_end_in_one_line(tmp_path, extra, message):
    done = _train(
        "-m",
        "trainer.epochs=1,2",
        "hydra/sweeper=branches",
        "debug=fast",
        *extra,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "tracking.enabled=false",
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """`python train.py -m trainer.epochs=1,2 trainer.lr_scheduler=wsd hydra/sweeper=branches` in a fresh folder."""
    work = tmp_path_factory.mktemp("branch-grid")
    for name in ("train.py", "conf"):
        (work / name).symlink_to(REPO_DIR / name)
    done = _train("-m", *GRID, *SIZE, "hydra.sweep.dir=multirun/first", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done


def test_branches_share_one_trunk_and_cost_fewer_steps(grid):
    work, done = grid
    sweep = work / "multirun" / "first"
    trunks = list((work / "outputs" / "trunks").iterdir())
    assert len(trunks) == 1, trunks  # one trunk for both lengths
    trunk = branches.TrunkFolder(trunks[0])
    # 64 utterances in batches of 8: 8 steps per epoch; forks at 8-2 and 16-3; the fork at 6 is deleted once
    # its branch is done and the trunk has passed it (branch.keep_forks=false): no rerun can need it
    assert sorted(p.name for p in (trunk.path / "forks").iterdir()) == ["step-13"]
    assert "Deleted 1 fork(s) no rerun can need" in done.stdout + done.stderr
    compute = json.loads((sweep / "branches.json").read_text())
    assert compute["independent_steps"] == 8 + 16
    assert compute["compute_steps"] == 13 + 2 + 3  # the trunk once, then each cooldown
    assert compute["compute_ratio"] == pytest.approx(18 / 24)
    results = {}
    for metrics_file in sweep.glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        if "test_wer" in metrics:
            epochs = OmegaConf.load(metrics_file.parent / ".hydra" / "config.yaml").trainer.epochs
            results[epochs] = metrics
            assert (metrics_file.parent / "model" / "model.safetensors").is_file()  # saved like any run
            assert (metrics_file.parent / "predictions_test.jsonl").is_file()
    assert sorted(results) == [1, 2]
    assert [results[e]["train_steps"] for e in (1, 2)] == [8, 16]
    assert [results[e]["fork_step"] for e in (1, 2)] == [6, 13]
    assert all(trunk.done(e) for e in (1, 2))


def test_a_branch_is_the_independent_wsd_run_of_its_length(grid, tmp_path):
    """Up to its fork a WSD run is the trunk, so the branch must end where an independent run ends."""
    work, _ = grid
    done = _train(
        "trainer.epochs=2",
        "trainer.lr_scheduler=wsd",
        *SIZE,
        f"hydra.run.dir={tmp_path / 'alone'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    branch = branches.TrunkFolder(next((work / "outputs" / "trunks").iterdir())).done(2)
    # the final evaluation (step 16) of both: same weights, same dev loss
    final = lambda folder: [  # noqa: E731
        e
        for e in json.loads(next(Path(folder).glob("checkpoints/checkpoint-16/trainer_state.json")).read_text())[
            "log_history"
        ]
        if "eval_loss" in e and e["step"] == 16
    ][0]["eval_loss"]
    trunk_path = next((work / "outputs" / "trunks").iterdir())
    assert final(trunk_path / "branches" / "2") == pytest.approx(final(tmp_path / "alone"), rel=1e-5)
    assert branch["test_wer"] == pytest.approx(alone["test_wer"])


def test_mlflow_shows_the_trunk_and_branches_under_the_grid(grid):
    work, _ = grid
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asr-synthetic_ne").experiment_id
    parent = client.search_runs([experiment], "tags.sweep_role = 'parent'")[0]
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    roles = sorted(run.data.tags.get("branch_role") for run in children)
    assert roles == ["branch", "branch", "trunk"]  # one trunk run across its two trunk jobs
    trunk = next(run for run in children if run.data.tags["branch_role"] == "trunk")
    for run in children:
        if run.data.tags["branch_role"] == "branch":
            assert run.data.tags["branch_of"] == trunk.info.run_id
            assert run.data.tags["fork_step"] in ("6", "13")
            assert "test_wer" in run.data.metrics and run.info.status == "FINISHED"
    assert parent.data.metrics["compute_ratio"] == pytest.approx(18 / 24)
    assert parent.data.metrics["independent_steps"] == 24
    summary = list(csv.DictReader(open(work / "multirun" / "first" / "summary.csv")))
    assert sorted(row["role"] for row in summary) == ["branch", "branch", "trunk"]
    assert parent.data.tags["best_run_id"] != trunk.info.run_id  # the trunk is not a result


def test_rerun_resumes_the_trunk_and_skips_finished_branches(grid):
    work, _ = grid
    trunk = branches.TrunkFolder(next((work / "outputs" / "trunks").iterdir()))
    first_2 = trunk.done(2)
    # as if the job training the trunk's last stretch had been killed: no fork at 13, no branch of 2
    shutil.rmtree(trunk.fork(13))
    shutil.rmtree(trunk.checkpoints / "checkpoint-13")
    shutil.rmtree(trunk.branch(2))
    done = _train("-m", *GRID, *SIZE, "hydra.sweep.dir=multirun/second", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Trunk: steps 10 → 13" in output  # from its own checkpoint at 10, not from 0
    assert "the branch of 1 epochs is done; nothing to train" in output  # its fork (pruned) is not remade
    assert output.count("finished earlier") == 1  # the branch of 1 epoch
    compute = json.loads((work / "multirun" / "second" / "branches.json").read_text())
    assert compute["compute_steps"] == 3 + 3
    assert trunk.done(2)["test_loss"] == pytest.approx(first_2["test_loss"], rel=1e-5)  # the same result again


def test_branches_run_as_separate_jobs_with_a_parallel_launcher(tmp_path):
    work = tmp_path
    for name in ("train.py", "conf"):
        (work / name).symlink_to(REPO_DIR / name)
    done = _train(
        "-m", "trainer.epochs=1", "trainer.lr_scheduler=wsd", "hydra/sweeper=branches",
        "hydra/launcher=local_parallel", *SIZE, "hydra.sweep.dir=multirun/parallel", cwd=work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = work / "multirun" / "parallel"
    assert json.loads((sweep / "branches.json").read_text())["compute_steps"] == 6 + 2
    logs = sorted(sweep.glob(".submitit/*/*_log.err"))
    assert len({p.parent.name for p in logs}) == 2  # the trunk's job, then the branch's: each its own process
    assert (sweep / "1" / "model" / "model.safetensors").is_file()


def test_a_fork_lost_mid_copy_is_made_again(grid):
    """The trunk job killed while copying its checkpoint to forks/ (scancel, a time limit): the trunk's own
    checkpoint at the fork is there, the fork is not; the rerun keeps the fork from it and the grid finishes."""
    work, _ = grid
    trunk = branches.TrunkFolder(next((work / "outputs" / "trunks").iterdir()))
    assert (trunk.checkpoints / "checkpoint-13" / "trainer_state.json").is_file()
    shutil.rmtree(trunk.fork(13))
    shutil.rmtree(trunk.branch(2))
    partial = trunk.fork(13).with_name("step-13.partial")  # what copytree leaves when killed
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    done = _train("-m", *GRID, *SIZE, "hydra.sweep.dir=multirun/third", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "keeping step 13 (the fork of 2 epochs)" in done.stdout + done.stderr
    assert (trunk.fork(13) / "trainer_state.json").is_file() and not partial.exists()
    assert trunk.done(2) and trunk.done(2)["fork_step"] == 13


def test_a_trunk_trained_on_other_data_is_refused(tmp_path):
    """The trunk folder's name hashes the config only: a changed manifest behind the same config must not
    resume it or skip its finished branches."""
    trunk = branches.TrunkFolder(tmp_path / "trunk")
    trunk.set_trunk_run_id("run-1")
    trunk.check_data("aaaa")
    trunk.check_data("aaaa")  # the same data again: fine
    assert trunk.trunk_run_id() == "run-1"
    with pytest.raises(ConfigError, match=r"trained on other data \(dataset fingerprint aaaa, now bbbb\).*Fix: move"):
        trunk.check_data("bbbb")


def test_a_trunk_written_by_a_live_job_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    """Two sweeps on one trunk (a rerun while the first sweep's SLURM jobs still run): the second job stops
    with one line naming the holder; a lock left by a killed job is taken over."""
    work = tmp_path
    for name in ("train.py", "conf"):
        (work / name).symlink_to(REPO_DIR / name)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        trunks = work / "outputs" / "trunks"
        # the trunk folder of this grid: the sweeper names it after the config (read from a plan-free dry run)
        done = _train("-m", "trainer.epochs=1", "trainer.lr_scheduler=wsd", "hydra/sweeper=branches", *SIZE,
                      "hydra.sweep.dir=multirun/a", "tracking.enabled=false", cwd=work)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        [trunk] = list(trunks.iterdir())
        shutil.rmtree(trunk)  # the same grid again from the start, while a live process holds the lock
        trunk.mkdir()
        lock = {"host": socket.gethostname(), "pid": holder.pid, "job": "4242_0"}
        (trunk / "lock.json").write_text(json.dumps(lock))
        done = _train("-m", "trainer.epochs=1", "trainer.lr_scheduler=wsd", "hydra/sweeper=branches", *SIZE,
                      "hydra.sweep.dir=multirun/b", "tracking.enabled=false", cwd=work)  # fmt: skip
        assert done.returncode == 1
        last = [line for line in done.stderr.splitlines() if line.strip()][-1]
        assert last.startswith("error: ") and f"SLURM job 4242_0, pid {holder.pid}" in last and "Fix:" in last
        assert not (trunk / "checkpoints").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    with branches.Lease(trunk, lease_s=180) as lease:  # the holder is dead now: taken over
        assert json.loads((trunk / "lock.json").read_text())["pid"] == os.getpid()
    assert not (trunk / "lock.json").exists() and lease


def test_forks_are_kept_only_while_a_rerun_can_need_them(tmp_path):
    trunk = branches.TrunkFolder(tmp_path)
    for step in (6, 13, 30):
        (trunk.fork(step)).mkdir(parents=True)
    trunk.mark_done(1, {"fork_step": 6})
    trunk.mark_done(2, {"fork_step": 13})
    assert trunk.prune_forks() == [trunk.fork(6), trunk.fork(13)]  # done, and passed by the fork at 30
    trunk.mark_done(4, {"fork_step": 30})
    assert trunk.prune_forks() == [] and trunk.fork(30).is_dir()  # the furthest fork: the trunk resumes from it


def test_a_branch_with_dropout_and_length_grouping_is_the_independent_run(tmp_path):
    """With dropout, layerdrop and SpecAugment (regularization=seed) every random draw counts: the trunk's
    end-of-job evaluation at a fork between two evaluations must not move the RNG the branch resumes with,
    and length-grouped batches (trainer.group_by_length=true) must come in the same order after the fork."""
    setting = ["trainer.lr_scheduler=wsd", "regularization=seed", "trainer.group_by_length=true",
               "trainer.batch_seconds=null", *SIZE, "tracking.enabled=false"]  # fmt: skip
    for name in ("train.py", "conf"):
        (tmp_path / name).symlink_to(REPO_DIR / name)
    grid = _train("-m", "trainer.epochs=2", "hydra/sweeper=branches", *setting, "hydra.sweep.dir=grid", cwd=tmp_path)
    assert grid.returncode == 0, grid.stderr[-3000:]
    alone = _train("trainer.epochs=2", *setting, "hydra.run.dir=alone", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]

    def evals(folder: Path) -> dict[int, float]:
        state = json.loads(next(folder.glob("checkpoints/checkpoint-16/trainer_state.json")).read_text())
        return {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}

    [trunk] = list((tmp_path / "outputs" / "trunks").iterdir())
    branch, independent = evals(trunk / "branches" / "2"), evals(tmp_path / "alone")
    assert branch[16] == pytest.approx(independent[16], rel=1e-5)  # fork at 13: the cooldown drew the same
