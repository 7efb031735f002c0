"""One trial of a study: sample its values, compose its config, train it (pruned from inside the Trainer,
retried once at half the batch on CUDA out-of-memory), and report its metric, with its MLflow child run
tagged for what happened (COMPLETE, PRUNED, FAIL, OOM_RETRIED, REQUEUED). Also which trials count
toward the study's budget, which every worker checks before it trains.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from asr import branches, requeue
from asr.errors import RunPruned
from asr.paths import REPO_DIR
from asr.records import RunRecord, SweepJob
from asr.sweep.pruning import OptunaPruningCallback, rung_step
from asr.sweep.space import format_value, to_overrides
from asr.sweep.spec import EPOCHS, SweepSpec
from asr.sweep.storage import system_attrs
from asr.tracking import MlflowRun, tracking_uri

log = logging.getLogger(__name__)

CONF_DIR = REPO_DIR / "conf"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
OVER_BUDGET = "over_budget"  # user attr of a trial started after another worker took the last slot
INTERRUPTED = "interrupted"  # user attr of a trial stopped by Ctrl-C / SIGTERM: it runs again on resume


# ---- the budget -------------------------------------------------------------------------------
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
    record = RunRecord.read(output_dir)
    return record.run_id if record else None


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
        if trainer.batch_seconds:
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

    def objective(trial: optuna.Trial) -> float:
        from asr import pipeline

        _check_budget(trial, spec)
        params = {key: suggest(trial, key, dist) for key, dist in spec.space().distributions.items()}
        out = trial_dir(spec, trial.number)
        trial.set_user_attr("output_dir", str(out))
        try:
            train = _train_rungs if spec.fidelity == "branches" else _train
            metrics = train(trial, spec, params, out, train_fn or pipeline.run)
            value = _metric(metrics, spec.cfg.metric)
            trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            _tag_child(spec, _mlflow_run_id(out), "COMPLETE")
            return value
        except RunPruned as pruned:
            raise optuna.TrialPruned(str(pruned)) from pruned
        except optuna.TrialPruned:  # sweep.fidelity=branches: pruned at a rung
            raise
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


def _train(trial: optuna.Trial, spec: SweepSpec, params: dict[str, Any], out: Path, train_fn) -> dict:
    """The trial's training run (resumed from a dead worker's checkpoint if any); once more at half the
    batch and twice the accumulation if it runs out of CUDA memory (sweep.oom_retry)."""
    overrides = spec.trial_overrides(params)
    resume = _resume_checkpoint(trial, spec)
    callbacks = [OptunaPruningCallback(trial, spec.prune_metric)]
    train_cfg = compose_train_config(overrides)  # a sampled group option that does not exist fails here
    with open_dict(train_cfg):
        train_cfg.tracking.run_name = f"trial {trial.number}: " + (" ".join(to_overrides(params)) or "defaults")
    job = _sweep_job(trial, spec, params)
    for attempt in (1, 2):
        if attempt == 2:
            _free_cuda_memory()  # here, not in the except block: the exception's traceback holds the first model
        _save_config(out, train_cfg, overrides)
        try:
            return train_fn(
                train_cfg, out, overrides=overrides, callbacks=callbacks, resume_from_checkpoint=resume, sweep_job=job
            )
        except Exception as err:
            if not (attempt == 1 and spec.cfg.oom_retry and is_out_of_memory(err)):
                raise
            _tag_child(spec, _mlflow_run_id(out), "OOM_RETRIED")
            change = halve_batch(train_cfg)
            trial.set_user_attr("oom_retry", change)
            log.warning("trial %d ran out of memory; retrying once with %s", trial.number, change)
            resume = None
    raise AssertionError("unreachable: the second attempt returns or raises")


def _train_rungs(trial: optuna.Trial, spec: SweepSpec, params: dict[str, Any], out: Path, train_fn) -> dict:
    """sweep.fidelity=branches: the trial is one WSD trunk at its sampled settings; rung k trains the trunk on
    to the fork of the k-th length and that length's cooldown branch, a finished model whose dev metric is
    reported to the pruner. A pruned trial trains no further rung; a trial re-queued after its worker died
    goes on in the dead trial's trunk folder (finished branches are not trained again)."""
    trunk_dir = _trunk_dir(trial, spec, out)
    folder = branches.TrunkFolder(trunk_dir)
    container = _trial_run(trial, spec, params)
    steps = 0  # optimizer steps this trial trained: its trunk's and its branches'
    try:
        rungs = spec.rungs()
        for rung, epochs in enumerate(rungs):
            overrides = [*spec.trial_overrides(params), f"{EPOCHS}={epochs:g}", f"branch.trunk_dir={trunk_dir}"]
            metrics = folder.done(epochs)
            if metrics:
                log.info("trial %d: rung %d (%g epochs) finished earlier in %s", trial.number, rung, epochs, trunk_dir)
            else:
                job = _rung_job(trial, spec, params, container, rung, epochs)
                for role in ("trunk", "branch"):
                    role_cfg = compose_train_config([*overrides, f"branch.role={role}"])
                    _save_config(out / f"rung_{rung}_{role}", role_cfg, overrides)
                    metrics = train_fn(role_cfg, out / f"rung_{rung}_{role}", overrides=overrides, sweep_job=job)
                    steps += int(metrics.get("trunk_steps" if role == "trunk" else "branch_steps", 0))
                    trial.set_user_attr("optimizer_steps", steps)
            reported = {key: _metric(metrics, key) for key in dict.fromkeys((spec.cfg.metric, spec.prune_metric))}
            trial.set_user_attr(f"rung_{rung}", {"epochs": epochs, **reported})
            trial.report(reported[spec.prune_metric], step=rung_step(rung, spec.cfg.pruner))
            if rung < len(rungs) - 1 and trial.should_prune():  # the last rung is trained: nothing to save
                _end_trial_run(container, "FINISHED", "PRUNED")
                value = reported[spec.prune_metric]
                raise optuna.TrialPruned(f"rung {rung} ({epochs:g} epochs): {spec.prune_metric} {value:.4f}")
    except optuna.TrialPruned:
        raise
    except (KeyboardInterrupt, SystemExit):
        _end_trial_run(container, "KILLED", "INTERRUPTED")
        raise
    except Exception:
        _end_trial_run(container, "FAILED", "FAIL")
        raise
    _end_trial_run(container, "FINISHED", "COMPLETE")
    return metrics


def _trunk_dir(trial: optuna.Trial, spec: SweepSpec, out: Path) -> Path:
    """This trial's trunk folder, or, for a trial re-queued after its worker died, the dead trial's."""
    for number in system_attrs(trial).get("retry_history", []):  # set by RetryHeartbeatStaleTrialCallback
        earlier = trial_dir(spec, number) / "trunk"
        if earlier.is_dir():
            trial.set_user_attr("resumed_from", str(earlier))
            log.info("trial %d goes on in trial %d's trunk %s", trial.number, number, earlier)
            return earlier
    return out / "trunk"


def _trial_run(trial: optuna.Trial, spec: SweepSpec, params: dict[str, Any]) -> MlflowRun | None:
    """The trial's own MLflow run (a child of the study's); its trunk and branch runs are nested under it."""
    job = _sweep_job(trial, spec, params)
    if job is None:
        return None
    name = f"trial {trial.number}: " + (" ".join(to_overrides(params)) or "defaults")
    run = MlflowRun(OmegaConf.create(spec.tracking), name, {"sweep_fidelity": "branches"}, sweep=job)
    run.set_tag("sweep_role", "trial")  # a row per rung in `make compare`, not one for the trial
    if run.run_id:
        trial.set_user_attr("mlflow_run_id", run.run_id)
    return run


def _rung_job(trial, spec: SweepSpec, params: dict[str, Any], container, rung: int, epochs: float) -> SweepJob | None:
    if container is None or container.run_id is None:
        return None
    swept = {**{k: format_value(v) for k, v in params.items()}, EPOCHS: f"{epochs:g}"}
    tags = {"optuna_study": spec.cfg.study_name, "optuna_trial": str(trial.number), "rung": str(rung)}
    return SweepJob(container.run_id, trial.number, swept, tags=tags, sweep_id=spec.parent_run_id)


def _end_trial_run(container: MlflowRun | None, status: str, state: str) -> None:
    if container is not None and container.run_id:
        container.set_tag("trial_state", state)
        container.end(status)


def _sweep_job(trial: optuna.Trial, spec: SweepSpec, params: dict[str, Any]) -> SweepJob | None:
    """The trial as a child of the study's MLflow parent run (None without one)."""
    if not spec.parent_run_id:
        return None
    tags = {"optuna_study": spec.cfg.study_name, "optuna_trial": str(trial.number)}
    return SweepJob(spec.parent_run_id, trial.number, {k: format_value(v) for k, v in params.items()}, tags=tags)


def _metric(metrics: dict, metric: str) -> float:
    value = metrics.get(metric)
    if value is None:
        raise RuntimeError(f"the run reported no {metric}: set trainer.eval_steps below the run's step count")
    if value != value:  # NaN
        raise FloatingPointError(f"{metric} is NaN: the loss diverged; lower trainer.lr or narrow the search space")
    return float(value)


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
