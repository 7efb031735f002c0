"""Optuna sweeps: search spaces, pruning, parallel workers, crash recovery, both doors, reports.

Real studies in real SQLite storage, real training runs of the tiny model, real subprocesses
(two workers, a driver killed with SIGKILL, a second process reading the storage) and the
session's real MLflow store.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import SMALL_CORPUS, compose_cfg
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from asr.paths import REPO_DIR
from asr.sweep import run_study
from asr.sweep.pruning import build_pruner, rung_step
from asr.sweep.report import experiment_yaml, leaderboard
from asr.sweep.space import SearchSpaceError, parse_space, split_sweep_overrides
from asr.sweep.spec import spec_from_config
from asr.sweep.storage import open_storage, storage_url
from asr.sweep.study import load_study, work
from asr.tracking import tracking_uri

SWEEP_BASE = [*SMALL_CORPUS, "debug=fast"]  # 64 train utterances, 30 steps, an evaluation every 10


def study_args(tmp_path: Path, name: str, sweep_body: str, *extra: str) -> list[str]:
    """sweep.py arguments for a study defined by a sweep file written where Hydra finds it."""
    (tmp_path / "conf" / "sweep").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "sweep" / f"{name}.yaml").write_text(
        "defaults:\n  - /shared/sweep@_here_\n  - _self_\n" + sweep_body
    )
    return [
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"sweep={name}",
        *SWEEP_BASE,
        f"tracking.experiment=test-sweep-{name}",
        f"sweep.study_name={name}",
        f"sweep.dir={tmp_path / 'study'}",
        f"sweep.export_dir={tmp_path / 'conf' / 'experiment'}",
        *extra,
    ]


def spec_for(args: list[str]):
    return spec_from_config(compose_cfg(*args, config_name="study"), args)


def run_sweep_py(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "sweep.py", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


# ---- search spaces ------------------------------------------------------------------------------
@pytest.mark.fast
def test_every_grammar_form_maps_to_its_optuna_distribution():
    space = parse_space(
        {
            "trainer.lr": "tag(log, interval(1e-5, 1e-3))",
            "regularization.mask_time_prob": "interval(0.0, 0.1)",
            "trainer.warmup_steps": "int(interval(10, 200))",
            "model.config.hidden_size": "tag(log, int(interval(32, 512)))",
            "trainer.batch_size": "range(4, 17, 4)",
            "regularization.layerdrop": "range(0.0, 0.3, 0.1)",
            "trainer.epochs": "choice(8, 20, 40)",
            "model": "choice(tiny, w2v_bert_2)",
            "trainer.grad_accum": "1,2",
            "trainer.max_grad_norm": 1.0,
            "trainer": {"lr_scheduler": "choice(linear, cosine)"},  # nested, as `sweep.params.trainer.x=` gives
        }
    )
    assert space.distributions == {
        "trainer.lr": FloatDistribution(1e-5, 1e-3, log=True),
        "regularization.mask_time_prob": FloatDistribution(0.0, 0.1),
        "trainer.warmup_steps": IntDistribution(10, 200),
        "model.config.hidden_size": IntDistribution(32, 512, log=True),
        "trainer.batch_size": IntDistribution(4, 16, step=4),
        "regularization.layerdrop": FloatDistribution(0.0, 0.2, step=0.1),
        "trainer.epochs": CategoricalDistribution([8, 20, 40]),
        "model": CategoricalDistribution(["tiny", "w2v_bert_2"]),
        "trainer.grad_accum": CategoricalDistribution([1, 2]),
        "trainer.lr_scheduler": CategoricalDistribution(["linear", "cosine"]),
    }
    assert space.fixed == ["trainer.max_grad_norm=1.0"]
    assert space.grid_values["regularization.layerdrop"] == [0.0, 0.1, 0.2]  # Hydra's range: stop excluded
    with pytest.raises(SearchSpaceError, match="trainer.lr.*interval"):
        space.grid()
    grid = parse_space({"trainer.epochs": "choice(8, 20, 40)", "trainer.lr": "choice(1e-5, 3e-5)"}).grid()
    assert len(grid) == 6 and {"trainer.epochs": 40, "trainer.lr": 3e-5} in grid


@pytest.mark.parametrize(
    "text, message",
    [
        ("interval(1e-3, 1e-5)", "lower bound comes first"),
        ("tag(log, interval(0.0, 1.0))", "lower bound > 0"),
        ("shuffle(range(1, 5))", "shuffle"),
        ("choice(", "cannot parse"),
    ],
)
def test_bad_search_spaces_name_the_key_and_the_fix(text, message):
    with pytest.raises(SearchSpaceError, match=message) as err:
        parse_space({"trainer.lr": text})
    assert "trainer.lr" in str(err.value)


def test_command_line_sweeps_split_from_plain_overrides():
    params, rest = split_sweep_overrides(
        ["trainer.lr=tag(log,interval(1e-5,1e-3))", "trainer.epochs=2,4", "debug=fast"]
    )
    assert params == {"trainer.lr": "tag(log,interval(1e-5,1e-3))", "trainer.epochs": "2,4"}
    assert rest == ["debug=fast"]


def test_best_yaml_puts_groups_in_defaults_and_values_in_place():
    text = experiment_yaml(
        ["trainer=seed", "debug=fast", "trainer.lr=0.001", "+trainer.extra.eval_on_start=true", "sweep.workers=2"], ""
    )
    assert text.startswith("# @package _global_\n")
    assert "- override /trainer: seed" in text and "- /debug/fast" in text
    assert "lr: 0.001" in text and "eval_on_start: true" in text and "workers" not in text


# ---- pruning, failures, OOM (trials run in this process) ---------------------------------------
def _first_judged(pruner, step_of_report, good: list[float], bad: list[float]) -> int | None:
    """The report (from 0) at which `bad` is pruned, after a finished trial that reported `good`."""
    study = optuna.create_study(pruner=pruner)
    first = study.ask()
    for i, value in enumerate(good):
        first.report(value, step_of_report(i))
        first.should_prune()  # successive halving records a trial's rung values when it is asked
    study.tell(first, good[-1])
    second = study.ask()
    for i, value in enumerate(bad):
        second.report(value, step_of_report(i))
        if second.should_prune():
            return i
    return None


@pytest.mark.fast
@pytest.mark.parametrize("name", ["median", "percentile", "successive_halving"])
def test_warmup_evals_reports_are_never_judged_and_the_next_one_is(name):
    """pruner.warmup_evals=2 at eval_steps=50: evaluations at steps 50 and 100 are never judged, the one at
    150 is (it was judged at 100 before: Optuna's pruners judge from n_warmup_steps / min_resource on)."""
    cfg = OmegaConf.create(
        {"name": name, "warmup_evals": 2, "n_startup_trials": 1, "percentile": 25.0, "reduction_factor": 3}
    )

    def every_50(i):
        return (i + 1) * 50

    assert _first_judged(build_pruner(cfg, every_50), every_50, [0.1] * 5, [0.9] * 5) == 2


@pytest.mark.fast
def test_successive_halving_judges_every_rung_of_a_branches_study():
    """Rungs reported at reduction_factor ** k: a trial that was good at rung 0 and bad at rung 1 is pruned
    at rung 1 (at steps 1, 2, 3 Optuna judged rungs 0 and 2 only: rung 1 was never judged)."""
    cfg = OmegaConf.create({"name": "successive_halving", "warmup_evals": 0, "reduction_factor": 3})
    assert [rung_step(k, cfg) for k in range(3)] == [1, 3, 9]
    pruner = build_pruner(cfg, lambda i: rung_step(i, cfg))
    assert _first_judged(pruner, lambda i: rung_step(i, cfg), [0.5, 0.4, 0.3], [0.45, 0.9, 0.9]) == 1
    assert _first_judged(pruner, lambda i: i + 1, [0.5, 0.4, 0.3], [0.45, 0.9, 0.9]) == 2  # the old steps


def test_pruner_stops_an_absurd_learning_rate_before_its_last_evaluation(tmp_path):
    """Two sane trials set the median; lr=30 blows the loss up and is pruned at its first eligible eval."""
    args = study_args(
        tmp_path,
        "prune",
        "params:\n  trainer.lr: tag(log, interval(1e-4, 100.0))\n",
        "sweep.metric=eval_loss",
        "sweep.pruner.warmup_evals=1",
        "sweep.pruner.n_startup_trials=2",
        "sweep.n_trials=3",
    )
    spec = spec_for(args)
    study = load_study(spec)
    for lr in (3e-3, 2e-3, 30.0):
        study.enqueue_trial({"trainer.lr": lr})
    run_study(spec)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    sane, bad = trials[0], trials[2]
    assert max(sane.intermediate_values) == 30  # sane trials report every evaluation to the end
    assert bad.user_attrs["pruned_at_step"] < 30 and max(bad.intermediate_values) == bad.user_attrs["pruned_at_step"]
    step = bad.user_attrs["pruned_at_step"]
    last = bad.intermediate_values[step]
    assert math.isnan(last) or last > max(t.intermediate_values[step] for t in trials[:2])  # diverged (NaN) or worse
    assert bad.value == (
        None if math.isnan(last) else last
    )  # recorded PRUNED with its last value (Optuna stores NaN as none)
    assert not (tmp_path / "study" / "trial_0002" / "metrics.json").exists()  # no test pass for a pruned trial
    client = MlflowClient(tracking_uri())
    child = client.get_run(bad.user_attrs["mlflow_run_id"])
    assert child.info.status == "FINISHED" and child.data.tags["trial_state"] == "PRUNED"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")] == sorted(
        bad.intermediate_values
    )


@pytest.mark.parametrize(
    ("batching", "first", "retry", "retry_attr"),
    [
        ("trainer.batch_seconds=null", (8, None, 1), (4, None, 2), "batch_size=4"),  # batches by count
        ("trainer.batch_seconds=20", (8, 20, 1), (8, 10.0, 2), "batch_size=8 batch_seconds=10.0"),  # by seconds
    ],
)
def test_out_of_memory_retries_once_with_half_the_batch_and_twice_the_accumulation(
    tmp_path, batching, first, retry, retry_attr
):
    args = study_args(
        tmp_path,
        "oom",
        "params:\n  trainer.lr: choice(0.003)\n",
        "sweep.n_trials=1",
        "tracking.enabled=false",
        batching,
    )
    calls = []

    def fake_train(cfg, output_dir, **kwargs):
        calls.append((cfg.trainer.batch_size, cfg.trainer.get("batch_seconds"), cfg.trainer.grad_accum))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"eval_wer": 0.5, "train_steps": 30}

    spec = spec_for(args)
    work(spec, train_fn=fake_train)
    assert calls == [first, retry]
    trial = load_study(spec).get_trials()[0]
    assert trial.state == TrialState.COMPLETE and trial.value == 0.5
    assert trial.user_attrs["oom_retry"].startswith(retry_attr) and "grad_accum=2" in trial.user_attrs["oom_retry"]


# ---- parallel workers, grids, failures, MLflow ---------------------------------------------------
def test_grid_with_two_workers_runs_every_point_once_and_records_failures(tmp_path):
    """2 x 2 grid, two worker processes: 4 trials, each point once; a bad scheduler FAILS with its
    reason (and a FAILED child run) while the study goes on."""
    args = study_args(
        tmp_path,
        "grid2",
        "sampler:\n  name: grid\npruner:\n  name: none\nn_trials: null\nparams:\n"
        "  trainer.lr: choice(1e-3, 3e-3)\n  trainer.lr_scheduler: choice(linear, no_such_schedule)\n",
        "sweep.workers=2",
    )
    run_sweep_py(args)
    spec = spec_for(args)
    study = load_study(spec)
    trials = study.get_trials()
    points = sorted((t.params["trainer.lr"], t.params["trainer.lr_scheduler"]) for t in trials)
    assert points == sorted((lr, s) for lr in (1e-3, 3e-3) for s in ("linear", "no_such_schedule"))
    assert states(study) == {"COMPLETE": 2, "FAIL": 2}
    logs = [(tmp_path / "study" / "workers" / f"worker_{i}.log").read_text() for i in (0, 1)]
    assert all("joins study" in log for log in logs)  # both workers pulled from the same study
    for trial in trials:
        if trial.state == TrialState.FAIL:
            assert trial.params["trainer.lr_scheduler"] == "no_such_schedule"
            assert (
                trial.user_attrs["fail_reason"].startswith("ValueError")
                and "no_such_schedule" in trial.user_attrs["fail_reason"]
            )

    client = MlflowClient(tracking_uri())
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["sweep_role"] == "parent" and parent.data.metrics["trials_complete"] == 2
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 4
    by_id = {run.info.run_id: run for run in children}
    for trial in trials:
        child = by_id[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["optuna_trial"] == str(trial.number)
        assert child.data.params["swept.trainer.lr_scheduler"] == trial.params["trainer.lr_scheduler"]
        assert child.info.status == ("FINISHED" if trial.state == TrialState.COMPLETE else "FAILED")
        assert child.data.tags["trial_state"] == trial.state.name
    artifacts = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "plots")
    }
    assert {"leaderboard.csv", "best.yaml", "plots/optimization_history.png"} <= artifacts

    # another process reads the study through Optuna's own API (what optuna-dashboard does)
    code = (
        "import optuna; s = optuna.load_study(study_name='grid2', "
        f"storage='{storage_url(spec.study)}'); print(len(s.trials), s.best_value)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["4", str(study.best_value)]


POP_ALL = """
import json, sys, optuna
from asr.sweep.storage import open_storage
study = optuna.load_study(study_name="pop", storage=open_storage(json.loads(sys.argv[1])))
claimed = []
while (trial_id := study._pop_waiting_trial_id()) is not None:  # what study.optimize does to take a queued trial
    claimed.append(trial_id)
print(json.dumps(claimed))
"""


def test_three_processes_claiming_queued_trials_never_share_one(tmp_path):
    """SQLite ignores SELECT ... FOR UPDATE: without BEGIN IMMEDIATE, 3 processes claimed 90 of
    80 queued trials (measured). Each grid point must go to exactly one worker."""
    cfg = {"storage": None, "dir": str(tmp_path), "heartbeat_interval": 20, "grace_period": 120, "max_retry": 2}
    study = optuna.create_study(study_name="pop", storage=open_storage(cfg))
    for x in range(80):
        study.enqueue_trial({"x": x})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", POP_ALL, json.dumps(cfg)], cwd=REPO_DIR, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    claimed = [trial_id for proc in procs for trial_id in json.loads(proc.communicate(timeout=120)[0])]
    assert sorted(claimed) == sorted(t._trial_id for t in study.get_trials())


# ---- crash recovery ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["SIGKILL", "SIGTERM"]
)
def test_killed_mid_trial_then_rerun_resumes_the_study_to_its_total(tmp_path, sig):
    """kill -9 of the sweep while trial 1 trains: the rerun fails it (no heartbeat), re-queues it,
    resumes it from its last checkpoint, and stops at n_trials; the MLflow parent is re-attached.
    SIGTERM (scancel, a time limit): the trial is marked interrupted at once and re-queued the same way."""
    name = f"crash_{sig.name.lower()}"
    args = study_args(
        tmp_path,
        name,
        "params:\n  trainer.lr: tag(log, interval(1e-3, 1e-2))\n",
        "sweep.n_trials=3",
        "sweep.heartbeat_interval=1",
        "sweep.grace_period=2",
        "trainer.max_steps=60",
        "trainer.eval_steps=10",
        "trainer.save_steps=10",
    )
    proc = subprocess.Popen(
        [sys.executable, "sweep.py", *args], cwd=REPO_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "study" / "trial_0001" / "checkpoints"
    deadline = time.monotonic() + 240
    # a complete checkpoint (trainer_state.json is written last): a kill during the first save leaves none
    while (
        not list(checkpoints.glob("checkpoint-*/trainer_state.json"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before trial 1 wrote a checkpoint"
    os.kill(proc.pid, sig)
    proc.wait()
    spec = spec_for(args)
    study = load_study(spec)
    assert states(study) == {"COMPLETE": 1, "RUNNING": 1}
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    if sig == signal.SIGTERM:
        assert study.trials[1].user_attrs["interrupted"] is True
        assert MlflowClient(tracking_uri()).get_run(parent_id).info.status == "KILLED"

    time.sleep(2.5)  # past the grace period
    run_sweep_py(args)
    study = load_study(spec)
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}  # the dead trial + 3 results: the total, not more
    assert (
        len({t.params["trainer.lr"] for t in study.trials if t.state == TrialState.COMPLETE}) == 3
    )  # no replayed proposal
    dead = study.trials[1]
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 1)
    assert dead.state == TrialState.FAIL and retry.params == dead.params
    assert Path(retry.user_attrs["resumed_from"]).parent == checkpoints
    resumed_step = int(retry.user_attrs["resumed_from"].rsplit("-", 1)[1])
    assert min(s for s in retry.intermediate_values if s > resumed_step) == resumed_step + 10  # went on from there
    assert retry.user_attrs["metrics"]["train_steps"] == 60
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id  # re-attached, not duplicated
    client = MlflowClient(tracking_uri())
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    parents = client.search_runs(
        [parent.info.experiment_id], f"tags.sweep_role = 'parent' AND tags.optuna_study = '{name}'"
    )
    assert len(parents) == 1

    # best.yaml composes back into train.py as an experiment
    best = study.best_trial
    cfg = compose_cfg(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"experiment=best_{name}")
    assert cfg.trainer.lr == pytest.approx(best.params["trainer.lr"])
    assert cfg.trainer.max_steps == 60 and cfg.dataset.max_utterances.train == 64 and cfg.dataset.sizes.train == 400
    table = leaderboard(study)
    assert list(table["trial"])[:1] == [best.number] and len(table) == 3  # the dead attempt is not a result


# ---- the Hydra sweeper door -------------------------------------------------------------------
@pytest.mark.slow  # the plugin door as README types it runs in tests/test_readme.py
def test_train_py_multirun_with_the_optuna_sweeper_plugin_and_submitit_workers(tmp_path):
    """`train.py -m hydra/sweeper=optuna`, its two workers as a submitit job array (local executor,
    the same code path as hydra/launcher=slurm)."""
    args = [
        "-m",
        "hydra/sweeper=optuna",
        "hydra/launcher=submitit_local",
        "hydra.sweeper.workers=2",
        "trainer.lr=tag(log,interval(1e-3,1e-2))",
        "trainer.epochs=1,2",
        *SWEEP_BASE,
        "tracking.experiment=test-sweep-plugin",
        "hydra.sweeper.study_name=plugin",
        f"hydra.sweeper.dir={tmp_path / 'study'}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.export_dir=null",
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    study = optuna.load_study(study_name="plugin", storage=f"sqlite:///{tmp_path / 'study' / 'optuna.db'}")
    assert states(study) == {"COMPLETE": 3}
    assert all(
        set(t.params) == {"trainer.lr", "trainer.epochs"} and 1e-3 <= t.params["trainer.lr"] <= 1e-2
        for t in study.trials
    )
    client = MlflowClient(tracking_uri())
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    # no second parent from the -m callback: the study's is the only one in this experiment
    assert len(client.search_runs([parent.info.experiment_id], "tags.sweep_role = 'parent'")) == 1
    assert json.loads((tmp_path / "study" / "trial_0000" / "mlflow_run.json").read_text())["run_id"] in {
        c.info.run_id for c in children
    }
    job_logs = list((tmp_path / "study" / "submitit").glob("*/*_log.err"))
    assert len(job_logs) == 2 and all("joins study 'plugin'" in log.read_text() for log in job_logs)


# ---- the command line against the study file ----------------------------------------------------


@pytest.mark.fast
def test_a_command_line_value_wins_over_the_study_files_fixed_value():
    """`python sweep.py trainer.eval_steps=10`: cpu_demo fixes eval_steps 100, the user's 10 must win."""
    args = ["trainer.eval_steps=10"]
    spec = spec_for(args)
    overrides = spec.trial_overrides({"trainer.lr": 1e-3})
    assert "trainer.eval_steps=100" not in overrides and overrides.count("trainer.eval_steps=10") == 1
    from asr.sweep.trial import compose_train_config

    cfg = compose_train_config(overrides)
    assert cfg.trainer.eval_steps == 10 and cfg.trainer.epochs == 3 and cfg.trainer.lr == 1e-3


@pytest.mark.fast
def test_a_command_line_value_for_a_swept_key_is_refused_with_the_fix():
    with pytest.raises(SearchSpaceError, match=r"trainer.lr is searched by the study.*sweep.params.trainer.lr"):
        spec_for(["trainer.lr=1e-3"])


@pytest.mark.fast
def test_one_search_space_entry_changed_added_or_removed_from_the_command_line():
    """The documented forms: sweep.params.<key>=<value> fixes a key, a quoted range changes one,
    + adds one, ~ removes one; the rest of the study file's space stays."""
    spec = spec_for(
        [
            "sweep.params.trainer.eval_steps=10",
            "sweep.params.trainer.lr='choice(1e-3, 2e-3)'",
            "+sweep.params.trainer.weight_decay='interval(0.0, 0.1)'",
            "~sweep.params.trainer.warmup_steps",
        ]
    )
    space = spec.space()
    assert space.distributions["trainer.lr"] == CategoricalDistribution([1e-3, 2e-3])
    assert space.distributions["trainer.weight_decay"] == FloatDistribution(0.0, 0.1)
    assert "trainer.warmup_steps" not in space.distributions and "regularization.mask_time_prob" in space.distributions
    assert "trainer.eval_steps=10" in space.fixed and "trainer.epochs=3" in space.fixed


@pytest.mark.fast
def test_the_private_optuna_calls_work_on_the_installed_optuna(tmp_path):
    """asr/sweep/storage.py reaches into Optuna where it has no public API. A new Optuna that changes
    those internals must fail here, with what to do, not in the middle of a study."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from asr.sweep.storage import CHECKED_OPTUNA, mark_failed, stored_trial, system_attrs

    version = ".".join(optuna.__version__.split(".")[:2])
    assert version in CHECKED_OPTUNA, (
        f"optuna {optuna.__version__} is not among {CHECKED_OPTUNA}: check the private calls "
        "at the end of asr/sweep/storage.py against it, then add it to CHECKED_OPTUNA"
    )
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'internals.db'}")
    study.ask({"x": FloatDistribution(0, 1)})
    running = study.get_trials(deepcopy=False)[0]
    mark_failed(study, running)  # what a SIGTERMed worker's trial needs
    failed = stored_trial(study, running)
    assert failed.state == TrialState.FAIL and failed.number == running.number
    mark_failed(study, running)  # a second time: a finished trial is left as it is
    RetryHeartbeatStaleTrialCallback(max_retry=2)(study, failed)  # re-queued as a dead worker's trial is
    retry = study.ask({"x": FloatDistribution(0, 1)})
    assert system_attrs(retry)["retry_history"] == [failed.number] and retry.params == failed.params
