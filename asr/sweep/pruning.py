"""Pruning on eval WER from inside the HF Trainer, and the pruners a sweep file can name."""

from __future__ import annotations

import logging

import optuna
from omegaconf import DictConfig
from transformers import TrainerCallback

from asr.errors import RunPruned

log = logging.getLogger(__name__)


class OptunaPruningCallback(TrainerCallback):
    """Reports the metric at every evaluation (step = global step) and stops a hopeless trial.

    Raising `RunPruned` leaves the Trainer at once; the training run closes the trial's MLflow
    run with `trial_state=PRUNED` (curves kept), and the objective turns it into Optuna's
    `TrialPruned`, so Optuna records the trial PRUNED with the last reported value.
    """

    def __init__(self, trial: optuna.Trial, metric: str = "eval_wer") -> None:
        self.trial = trial
        self.metric = metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.metric not in metrics:
            return
        value = float(metrics[self.metric])
        self.trial.report(value, step=state.global_step)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_step", state.global_step)
            log.info("trial %d pruned at step %d: %s %.4f", self.trial.number, state.global_step, self.metric, value)
            raise RunPruned(f"{self.metric} {value:.4f} at step {state.global_step}")


def rung_step(rung: int, cfg: DictConfig) -> int:
    """sweep.fidelity=branches: the step rung `rung` (from 0) is reported at, reduction_factor ** rung.

    Optuna's successive halving (and each Hyperband bracket) judges a trial only at the steps
    min_resource * reduction_factor ** k; with rungs reported at 1, 2, 3... it judged the first rung,
    skipped the second and judged the third only once it was trained. The median and percentile
    pruners compare trials at the same step, whatever its number.
    """
    return cfg.reduction_factor**rung


def build_pruner(cfg: DictConfig, step_of_report) -> optuna.pruners.BasePruner:
    """sweep.pruner → an Optuna pruner; the first `warmup_evals` reports are never judged.

    CTC models emit only blanks for their first few hundred steps (WER 1.0 for everyone), so
    comparing trials there would prune at random. `step_of_report(i)`: the step of a trial's i-th
    report (from 0): (i + 1) * eval_steps for evaluations, `rung_step(i)` for rungs. The first
    report judged is the warmup_evals-th, at step_of_report(warmup_evals).
    """
    first_judged = step_of_report(cfg.warmup_evals)
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=first_judged)
    if cfg.name == "percentile":
        return optuna.pruners.PercentilePruner(
            cfg.percentile, n_startup_trials=cfg.n_startup_trials, n_warmup_steps=first_judged
        )
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first_judged, reduction_factor=cfg.reduction_factor)
    if cfg.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_judged, reduction_factor=cfg.reduction_factor)
    if cfg.name in ("none", None):
        return optuna.pruners.NopPruner()
    raise ValueError(
        f"sweep.pruner.name={cfg.name!r}: choose median, percentile, hyperband, successive_halving or none"
    )
