"""Studies whose trials share a trunk (sweep.fidelity=branches): each rung is a finished cooldown branch,
a pruned trial trains no further rung, and a re-queued trial goes on from its trunk's fork."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_CORPUS, compose_cfg
from mlflow.tracking import MlflowClient

from asr import pipeline
from asr.branches import TrunkFolder
from asr.errors import UserError
from asr.paths import REPO_DIR
from asr.sweep import run_study
from asr.sweep.spec import spec_from_config
from asr.sweep.study import load_study, requeue_interrupted, work
from asr.sweep_summary import summary_table
from asr.tracking import tracking_uri

# 64 train utterances: one epoch is ~10 steps (WSD: fork at 80%), an evaluation every 10 steps and at the end
BASE = [*SMALL_CORPUS, "debug=fast", "trainer.max_steps=null"]
STUDY = """
n_trials: 2
workers: 1
sampler:
  name: grid
pruner:
  name: median
  n_startup_trials: 1
  warmup_evals: 0
  metric: eval_loss
fidelity: branches
params:
  trainer:
    lr: choice(3e-3, 1e-6)
    epochs: choice(1, 2)
"""


def _spec(tmp_path: Path, name: str, body: str = STUDY, *extra: str):
    (tmp_path / "conf" / "sweep").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "sweep" / f"{name}.yaml").write_text(
        "defaults:\n  - /shared/sweep@_here_\n  - _self_\n" + body
    )
    args = [
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"sweep={name}",
        *BASE,
        f"tracking.experiment=test-branch-sweep-{name}",
        f"sweep.study_name={name}",
        f"sweep.dir={tmp_path / 'study'}",
        "sweep.export_dir=null",
        *extra,
    ]
    return spec_from_config(compose_cfg(*args, config_name="study"), args)


def _trunk(spec, number: int) -> TrunkFolder:
    return TrunkFolder(spec.dir / f"trial_{number:04d}" / "trunk")


def test_a_pruned_trial_trains_no_further_rung_and_mlflow_nests_rungs_under_trials(tmp_path):
    spec = _spec(tmp_path, "rungs")
    study = run_study(spec)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert by_number[0].state.name == "COMPLETE" and by_number[1].state.name == "PRUNED"
    assert by_number[0].params == {"trainer.lr": 3e-3} and by_number[1].params == {"trainer.lr": 1e-6}
    complete, pruned = _trunk(spec, 0), _trunk(spec, 1)
    assert complete.done(1) and complete.done(2)
    assert by_number[0].value == pytest.approx(complete.done(2)["eval_wer"])  # the longest rung's branch
    # the pruner saw dev loss (pruner.metric), not WER: at rung 0 both models may emit only blanks
    assert by_number[1].intermediate_values == {1: pytest.approx(pruned.done(1)["eval_loss"])}
    assert by_number[1].user_attrs["rung_0"] == {
        "epochs": 1,
        "eval_wer": pytest.approx(pruned.done(1)["eval_wer"]),
        "eval_loss": pytest.approx(pruned.done(1)["eval_loss"]),
    }
    assert pruned.done(1) and not pruned.done(2)  # pruned after rung 0: no branch of 2 epochs ...
    fork_of_1 = complete.done(1)["fork_step"]
    assert not (pruned.path / "branches" / "2").exists()
    steps = [int(p.name.split("-")[1]) for p in pruned.checkpoints.glob("checkpoint-*")]
    assert max(steps) <= fork_of_1  # ... and its trunk never went past the first fork
    assert by_number[0].user_attrs["rung_0"]["epochs"] == 1 and by_number[0].user_attrs["rung_1"]["epochs"] == 2
    trained = complete.done(2)["train_steps"] + complete.done(1)["branch_steps"]  # trunk to fork 2 + both cooldowns
    assert by_number[0].user_attrs["optimizer_steps"] == trained

    client = MlflowClient(tracking_uri())
    parent = client.get_run(spec.parent_run_id)
    table = summary_table(client, parent)
    branches_only = table[table["role"] == "branch"].sort_values(["job", "rung"])
    assert list(zip(branches_only["job"], branches_only["rung"], branches_only["trainer.epochs"])) == [
        (0, 0, "1"),
        (0, 1, "2"),
        (1, 0, "1"),
    ]
    for _, row in table.iterrows():  # every trunk and branch run sits under its trial's run, under the study's
        trial_run = client.get_run(client.get_run(row["run_id"]).data.tags["mlflow.parentRunId"])
        assert trial_run.data.tags["sweep_role"] == "trial"
        assert trial_run.data.tags["mlflow.parentRunId"] == spec.parent_run_id
        assert trial_run.data.tags["optuna_trial"] == str(row["job"])
    best = (spec.dir / "best.yaml").read_text()
    assert "epochs: 2" in best and "lr: 0.003" in best  # the winner at its longest rung


def test_a_requeued_trial_goes_on_from_its_trunks_fork(tmp_path):
    """The worker stops (SIGTERM, a requeue) as the trial starts its second rung; the study run again
    re-queues the trial, which finds its first rung done and trains its trunk on from that rung's fork."""
    spec = _spec(tmp_path, "resume", STUDY.replace("n_trials: 2", "n_trials: 1"))
    calls = []

    def stopped_at_the_second_trunk(cfg, output_dir, **kwargs):
        calls.append((cfg.branch.role, cfg.trainer.epochs))
        if calls.count(("trunk", 2)) == 1 and calls[-1] == ("trunk", 2):
            raise KeyboardInterrupt
        return pipeline.run(cfg, output_dir, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        work(spec, 0, stopped_at_the_second_trunk)
    first = _trunk(spec, 0)
    fork_of_1 = first.done(1)["fork_step"]
    assert not first.done(2)
    assert requeue_interrupted(load_study(spec), max_retry=2) == 1
    work(spec, 0, stopped_at_the_second_trunk)
    study = load_study(spec)
    resumed = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert len(resumed) == 1 and resumed[0].number == 1
    assert calls == [("trunk", 1), ("branch", 1), ("trunk", 2), ("trunk", 2), ("branch", 2)]  # rung 0 not redone
    trunk_metrics = json.loads((spec.dir / "trial_0001" / "rung_1_trunk" / "metrics.json").read_text())
    assert trunk_metrics["trunk_start_step"] == fork_of_1  # from the fork, not from step 0
    assert first.done(2) and Path(resumed[0].user_attrs["resumed_from"]).resolve() == first.path.resolve()


def test_kill_9_mid_rung_then_rerun_goes_on_from_the_trunks_last_checkpoint(tmp_path):
    """`sweep.py` killed (SIGKILL, the whole process group, as a node failure) while a trial's trunk trains on
    to its second rung's fork: the same command run again fails the dead trial (no heartbeat), re-queues it,
    takes over the dead process's trunk lease, skips the finished rung, and resumes the trunk from its newest
    checkpoint past the first fork."""
    body = (
        STUDY.replace("n_trials: 2", "n_trials: 1")
        .replace("lr: choice(3e-3, 1e-6)", "lr: choice(3e-3)")  # one grid point: the retry is the only trial left
        .replace("epochs: choice(1, 2)", "epochs: choice(1, 6)")
    )
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    (tmp_path / "conf" / "sweep" / "killed.yaml").write_text("defaults:\n  - /shared/sweep@_here_\n  - _self_\n" + body)
    args = [
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "sweep=killed",
        *BASE,
        "tracking.experiment=test-branch-sweep-killed",
        "sweep.study_name=killed",
        f"sweep.dir={tmp_path / 'study'}",
        "sweep.export_dir=null",
        "sweep.heartbeat_interval=1",
        "sweep.grace_period=2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "sweep.py", *args],
        cwd=REPO_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    trunk = TrunkFolder(tmp_path / "study" / "trial_0000" / "trunk")
    deadline, past_fork = time.monotonic() + 240, []
    while not past_fork and proc.poll() is None and time.monotonic() < deadline:
        fork = (trunk.done(1) or {}).get("fork_step")
        saved = [int(p.parent.name.split("-")[1]) for p in trunk.checkpoints.glob("checkpoint-*/trainer_state.json")]
        past_fork = [step for step in saved if fork is not None and step > fork]
        time.sleep(0.1)
    assert proc.poll() is None, "the study ended before the trunk saved a checkpoint past its first fork"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not trunk.done(6), "killed too late: the second rung's trunk had finished"
    assert (trunk.path / "lock.json").exists()  # the dead process's lease, left behind
    fork_of_1 = trunk.done(1)["fork_step"]

    time.sleep(2.5)  # past the grace period: the trial's heartbeat is stale
    result = subprocess.run([sys.executable, "sweep.py", *args], cwd=REPO_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    study = load_study(_spec(tmp_path, "killed", body))
    assert sorted(t.state.name for t in study.get_trials(deepcopy=False)) == ["COMPLETE", "FAIL"]
    retry = study.trials[1]
    assert Path(retry.user_attrs["resumed_from"]).resolve() == trunk.path.resolve()
    assert not list((tmp_path / "study" / "trial_0001").glob("rung_0_*"))  # the finished rung is not trained again
    resumed = json.loads((tmp_path / "study" / "trial_0001" / "rung_1_trunk" / "metrics.json").read_text())
    assert resumed["trunk_start_step"] >= max(past_fork) > fork_of_1  # from its checkpoint, not the fork or step 0
    assert trunk.done(6) and set(retry.user_attrs) >= {"rung_0", "rung_1"}


def test_a_trial_that_trained_its_last_rung_is_complete_however_it_compares(tmp_path):
    """The pruner is not asked after the last rung: that rung's compute is spent, and pruning would only
    drop its finished model from the study's results (the training itself is stubbed: only the study's
    bookkeeping runs)."""
    spec = _spec(tmp_path, "last", STUDY, "tracking.enabled=false")

    losses = {("trial_0000", 1): 5.0, ("trial_0000", 2): 1.0, ("trial_0001", 1): 4.0, ("trial_0001", 2): 9.0}

    def trained(cfg, output_dir, **kwargs):  # trial 1 is ahead of trial 0 at rung 0, far behind at rung 1
        loss = losses[(Path(output_dir).parent.name, cfg.trainer.epochs)]
        return {"eval_wer": loss / 10, "eval_loss": loss, "trunk_steps": 1}

    work(spec, 0, trained)
    second = load_study(spec).trials[1]
    assert second.state.name == "COMPLETE" and second.value == pytest.approx(0.9)
    assert second.intermediate_values == {1: 4.0, 3: 9.0}  # rung k at reduction_factor ** k


def test_settings_that_cannot_share_a_trunk_are_refused_before_any_trial(tmp_path):
    with pytest.raises(UserError, match="sweep.params.trainer.epochs='choice"):
        _spec(tmp_path, "no_epochs", STUDY.replace("    epochs: choice(1, 2)\n", ""))
    spec = _spec(tmp_path, "linear", STUDY, "trainer.lr_scheduler=linear")
    with pytest.raises(UserError, match="trainer.lr_scheduler=wsd"):
        run_study(spec)


@pytest.mark.fast
def test_the_lr_branches_preset_samples_the_rate_and_trains_every_length_as_a_rung():
    args = ["sweep=lr_branches"]
    spec = spec_from_config(compose_cfg(*args, config_name="study"), args)
    assert spec.fidelity == "branches" and spec.rungs() == [2.0, 4.0, 7.0]
    assert list(spec.space().distributions) == ["trainer.lr"]
