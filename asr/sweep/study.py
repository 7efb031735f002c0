"""The sweep engine: one Optuna study in shared storage, trials pulled by any number of workers.

A worker is a loop: fail trials whose worker died (heartbeat), stop when the study holds
`n_trials` results, else run one more trial. Trials are real training runs
(`asr.training.run`) composed from the same Hydra config as `train.py`, so a trial is exactly
the run `python train.py <its overrides>` would make. Workers never wait for each other:
each one asks Optuna for its next trial as soon as its last one ends.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import StorageInternalError
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from asr import requeue
from asr.paths import REPO_DIR
from asr.sweep.pruning import OptunaPruningCallback, build_pruner
from asr.sweep.space import SearchSpace, format_value, to_overrides
from asr.sweep.spec import SweepSpec
from asr.sweep.storage import mark_failed, open_storage, stored_trial, system_attrs
from asr.tracking import SweepJob, tracking_uri
from asr.trainer import RunPruned

log = logging.getLogger(__name__)

CONF_DIR = REPO_DIR / "conf"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
OVER_BUDGET = "over_budget"  # user attr of a trial started after another worker took the last slot
INTERRUPTED = "interrupted"  # user attr of a trial stopped by Ctrl-C / SIGTERM: it runs again on resume


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
        pruner=build_pruner(cfg.pruner, spec.eval_steps),
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


def n_trials_total(spec: SweepSpec) -> int:
    cfg = spec.cfg
    if cfg.n_trials is not None:
        return int(cfg.n_trials)
    if cfg.sampler.name == "grid":
        return len(spec.space().grid())
    raise ValueError("sweep.n_trials is null: set the study's total number of trials, e.g. sweep.n_trials=20")


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that were queued again (dead worker, interrupt): their retry replaces them."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use the study's budget: all but re-queued dead ones and over-budget starts."""
    retried = retried_numbers(trials)
    return [
        t for t in trials if not (t.state == TrialState.FAIL and (t.number in retried or t.user_attrs.get(OVER_BUDGET)))
    ]


# ---- one trial --------------------------------------------------------------------------------
def suggest(trial: optuna.Trial, key: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            key, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    raise TypeError(f"{key}: unsupported distribution {distribution!r}")


def compose_train_config(overrides: list[str]) -> DictConfig:
    """The config `python train.py <overrides>` runs with (inside a Hydra app its search path is reused)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def latest_checkpoint(trial_dir: Path) -> str | None:
    """The newest complete checkpoint: a worker killed while saving leaves one without trainer_state.json."""
    return requeue.latest_checkpoint(trial_dir / "checkpoints")


def trial_dir(spec: SweepSpec, number: int) -> Path:
    return spec.dir / f"trial_{number:04d}"


def _mlflow_run_id(output_dir: Path) -> str | None:
    record = output_dir / "mlflow_run.json"
    return json.loads(record.read_text())["run_id"] if record.is_file() else None


def _tag_child(spec: SweepSpec, run_id: str | None, state: str) -> None:
    if run_id and spec.tracking.get("enabled"):
        MlflowClient(tracking_uri(spec.tracking.get("uri"))).set_tag(run_id, "trial_state", state)


def _end_requeued_child(spec: SweepSpec, run_id: str | None) -> None:
    """A trial's run left SCHEDULED by a requeue ends KILLED: the trial comes back as a new trial."""
    if run_id and spec.tracking.get("enabled"):
        client = MlflowClient(tracking_uri(spec.tracking.get("uri")))
        if client.get_run(run_id).info.status == "SCHEDULED":
            client.set_tag(run_id, "trial_state", "REQUEUED")
            client.set_terminated(run_id, status="KILLED")


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "CUDA out of memory" in str(err)


def halve_batch(cfg: DictConfig) -> str:
    """Same effective batch with half the memory: half the batch (or batch seconds), twice the accumulation."""
    trainer = cfg.trainer
    with open_dict(trainer):
        if trainer.get("batch_seconds"):
            trainer.batch_seconds = trainer.batch_seconds / 2
        else:
            if trainer.batch_size < 2:
                raise RuntimeError(
                    "out of memory at batch size 1: use a smaller model, shorter audio "
                    "(audit.max_seconds) or a bigger GPU"
                )
            trainer.batch_size = trainer.batch_size // 2
        trainer.grad_accum = trainer.grad_accum * 2
    return (
        f"batch_size={trainer.batch_size} batch_seconds={trainer.get('batch_seconds')} grad_accum={trainer.grad_accum}"
    )


def make_objective(spec: SweepSpec, train_fn=None):
    """The function Optuna calls per trial: sample → compose → train (with pruning) → metric."""
    space = spec.space()
    cfg = spec.cfg

    def objective(trial: optuna.Trial) -> float:
        from asr import training

        run_training = train_fn or training.run
        _check_budget(trial, spec)
        params = {key: suggest(trial, key, dist) for key, dist in space.distributions.items()}
        overrides = spec.trial_overrides(params)
        out = trial_dir(spec, trial.number)
        trial.set_user_attr("output_dir", str(out))
        resume = _resume_checkpoint(trial, spec)
        job = (
            SweepJob(
                spec.parent_run_id,
                trial.number,
                {k: format_value(v) for k, v in params.items()},
                tags={"optuna_study": cfg.study_name, "optuna_trial": str(trial.number)},
            )
            if spec.parent_run_id
            else None
        )
        callbacks = [OptunaPruningCallback(trial, cfg.metric)]
        try:
            train_cfg = compose_train_config(
                overrides
            )  # a sampled group option that does not exist fails here, with its reason
            with open_dict(train_cfg):
                train_cfg.tracking.run_name = f"trial {trial.number}: " + (" ".join(to_overrides(params)) or "defaults")
            for attempt in (1, 2):
                if attempt == 2:
                    # here, not in the except block: the exception's traceback holds the first model
                    _free_cuda_memory()
                _save_config(out, train_cfg, overrides)
                try:
                    metrics = run_training(
                        train_cfg,
                        out,
                        overrides=overrides,
                        callbacks=callbacks,
                        resume_from_checkpoint=resume,
                        sweep_job=job,
                    )
                    break
                except Exception as err:
                    if attempt == 1 and cfg.oom_retry and is_out_of_memory(err):
                        _tag_child(spec, _mlflow_run_id(out), "OOM_RETRIED")
                        change = halve_batch(train_cfg)
                        trial.set_user_attr("oom_retry", change)
                        log.warning("trial %d ran out of memory; retrying once with %s", trial.number, change)
                        resume = None
                        continue
                    raise
            value = metrics.get(cfg.metric)
            if value is None:
                raise RuntimeError(
                    f"the run reported no {cfg.metric}: set trainer.eval_steps below the run's step count"
                )
            if value != value:  # NaN
                raise FloatingPointError(
                    f"{cfg.metric} is NaN: the loss diverged; lower trainer.lr or narrow the search space"
                )
            trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            _tag_child(spec, _mlflow_run_id(out), "COMPLETE")
            return float(value)
        except RunPruned as pruned:
            raise optuna.TrialPruned(str(pruned)) from pruned
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C / SIGTERM / scancel / a requeue: re-queued on the next start
            trial.set_user_attr(INTERRUPTED, requeue.job_id() or True)
            _end_requeued_child(spec, _mlflow_run_id(out))
            raise
        except Exception as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:2000])
            _tag_child(spec, _mlflow_run_id(out), "FAIL")
            log.error("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
            raise
        finally:
            run_id = _mlflow_run_id(out)
            if run_id:
                trial.set_user_attr("mlflow_run_id", run_id)

    return objective


class OverBudget(Exception):
    """This trial started after the study's n_trials were all taken by other workers."""


def _check_budget(trial: optuna.Trial, spec: SweepSpec) -> None:
    """Exact total across racing workers: the first n_trials counted trials (by number) run, later ones stop."""
    trials = counted(trial.study.get_trials(deepcopy=False))
    before = [t for t in trials if t.number < trial.number]
    if len(before) >= n_trials_total(spec):
        trial.set_user_attr(OVER_BUDGET, True)
        raise OverBudget(f"the study already holds its {n_trials_total(spec)} trials")


def _resume_checkpoint(trial: optuna.Trial, spec: SweepSpec) -> str | None:
    """A re-queued trial whose worker died continues from the dead trial's last checkpoint."""
    history = system_attrs(trial).get("retry_history", [])  # set by RetryHeartbeatStaleTrialCallback
    for number in reversed(history):
        checkpoint = latest_checkpoint(trial_dir(spec, number))
        if checkpoint:
            trial.set_user_attr("resumed_from", checkpoint)
            log.info("trial %d resumes trial %d from %s", trial.number, number, checkpoint)
            return checkpoint
    return None


def _save_config(out: Path, train_cfg: DictConfig, overrides: list[str]) -> None:
    """The same .hydra/ files train.py leaves, so `asr.evaluate run_dir=<trial dir>` works on a trial."""
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(train_cfg, out / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), out / ".hydra" / "overrides.yaml")


def _free_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- a worker ---------------------------------------------------------------------------------
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
