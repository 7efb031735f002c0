"""The sweep engine: one Optuna study in shared storage, trials pulled by any number of workers.

A worker is a loop: fail trials whose worker died (heartbeat), stop when the study holds
`n_trials` results, else run one more trial. Trials are real training runs
(`asr.pipeline.run`) composed from the same Hydra config as `train.py`, so a trial is exactly
the run `python train.py <its overrides>` would make. Workers never wait for each other:
each one asks Optuna for its next trial as soon as its last one ends.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings

import optuna
from omegaconf import DictConfig
from optuna.exceptions import StorageInternalError
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from asr import requeue
from asr.sweep.pruning import build_pruner, rung_step
from asr.sweep.space import SearchSpace
from asr.sweep.spec import SweepSpec
from asr.sweep.storage import mark_failed, open_storage, stored_trial
from asr.sweep.trial import (
    FINISHED,
    INTERRUPTED,
    OVER_BUDGET,
    compose_train_config,
    counted,
    make_objective,
    n_trials_total,
    retried_numbers,
)

log = logging.getLogger(__name__)


# ---- study ------------------------------------------------------------------------------------
def build_sampler(cfg: DictConfig, worker: int = 0) -> optuna.samplers.BaseSampler:
    """sweep.sampler → an Optuna sampler. `grid` enqueues every point up front (see asr.sweep.study)."""
    seed = None if cfg.seed is None else cfg.seed + worker
    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials, constant_liar=True)
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.name == "grid":
        return optuna.samplers.RandomSampler(seed=seed)  # never asked: every grid point is enqueued
    raise ValueError(f"sweep.sampler.name={cfg.name!r}: choose tpe, random, grid or cmaes")


def load_study(spec: SweepSpec, worker: int = 0) -> optuna.Study:
    """The study (created on first use). Each worker seeds its sampler with seed + worker index:
    workers sharing one seed would propose identical trials while the study is still random."""
    if spec.eval_steps is None:
        spec.eval_steps = int(compose_train_config(spec.trial_overrides()).trainer.eval_steps)
    cfg = spec.cfg
    study = optuna.create_study(
        study_name=cfg.study_name,
        storage=open_storage(spec.study),
        sampler=build_sampler(cfg.sampler, worker),
        pruner=build_pruner(cfg.pruner, _report_steps(spec)),
        direction=cfg.direction,
        load_if_exists=True,
    )
    if existing := len(study.get_trials(deepcopy=False)):
        # A resumed study must not replay the proposals its first run already tried (same seed, same sequence).
        study.sampler = build_sampler(cfg.sampler, worker + 1000 * existing)
    return study


def enqueue_grid(study: optuna.Study, space: SearchSpace) -> int:
    """Queue every grid point once (WAITING trials). Workers pop them atomically from the storage,
    so each point runs exactly once however many workers there are; rerunning queues only what is missing."""
    queued = {
        json.dumps(t.params or t.system_attrs.get("fixed_params", {}), sort_keys=True, default=str)
        for t in study.get_trials(deepcopy=False)
        if not (t.state == TrialState.FAIL and t.user_attrs.get(OVER_BUDGET))
    }
    added = 0
    for point in space.grid():
        if json.dumps(point, sort_keys=True, default=str) not in queued:
            study.enqueue_trial(point, skip_if_exists=True)
            added += 1
    return added


def requeue_interrupted(study: optuna.Study, max_retry: int | None, job: str | None = None) -> int:
    """Trials stopped by Ctrl-C/SIGTERM/a requeue are queued again, like a dead worker's: same parameters,
    resumed from their last checkpoint, and not counted against n_trials. `job`: only those that this
    submitit job stopped (a requeued worker taking its own trial back)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    todo = [
        t
        for t in trials
        if t.state in (TrialState.FAIL, TrialState.RUNNING)
        and t.user_attrs.get(INTERRUPTED)
        and (job is None or t.user_attrs[INTERRUPTED] == job)
        and t.number not in retried
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        requeue = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        for trial in todo:
            if trial.state == TrialState.RUNNING:  # SystemExit (SIGTERM) leaves Optuna no chance to close it
                mark_failed(study, trial)
            requeue(study, stored_trial(study, trial))
    return len(todo)


# ---- a worker ---------------------------------------------------------------------------------
def _report_steps(spec: SweepSpec):
    """The step of a trial's i-th report to the pruner: its evaluations, or (sweep.fidelity=branches) its rungs."""
    if spec.fidelity == "branches":
        return lambda i: rung_step(i, spec.cfg.pruner)
    return lambda i: (i + 1) * spec.eval_steps


def work(spec: SweepSpec, worker: int = 0, train_fn=None) -> int:
    """Run trials until the study holds n_trials results (or sweep.timeout passes). Returns trials run here."""
    study = load_study(spec, worker)
    total = n_trials_total(spec)
    objective = make_objective(spec, train_fn)
    timeout = spec.study.get("timeout")
    started, ran = time.monotonic(), 0
    poll = max(
        1, min(3, spec.study["heartbeat_interval"] or 3)
    )  # an idle worker exits at most this long after the last trial
    log.info("worker %d (pid %d) joins study %r: %d trials in all", worker, os.getpid(), study.study_name, total)
    if (job := requeue.job_id()) and (taken := requeue_interrupted(study, spec.study["max_retry"], job=job)):
        log.info("worker %d: requeued job %s queues its interrupted trial again (%d)", worker, job, taken)
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)
            trials = counted(study.get_trials(deepcopy=False))
            finished = sum(t.state in FINISHED for t in trials)
            waiting = sum(t.state == TrialState.WAITING for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= total:
                break
            if timeout and time.monotonic() - started > timeout:
                log.info("worker %d: sweep.timeout=%ss reached; no new trial", worker, timeout)
                break
            if not waiting and finished + running >= total:
                time.sleep(poll)  # the last trials run elsewhere; a dead worker's trial is re-queued after grace_period
                continue
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            ran += 1
        except StorageInternalError as err:  # SQLite busy under concurrent writers: try again
            log.warning("worker %d: storage busy (%s); retrying", worker, err)
            time.sleep(1 + worker)
    log.info("worker %d: done after %d trials here", worker, ran)
    return ran
