"""Tune the LM weight alpha and the word bonus beta on saved dev logits with an Optuna study.

A trial only re-runs the beam search over the cached log-probabilities (asr.lm.logits): no model
forward pass. The sampler is TPE, seeded; the first trial is the current setting (pyctcdecode's
defaults, or the last tuned values), so the result is never worse than it on dev. Ties in WER
go to the lower CER, then to the earlier trial. Test logits are never looked at.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import optuna
from omegaconf import DictConfig

from asr.lm import INFO_FILE
from asr.lm.decode import CTCDecoder
from asr.metrics import error_rates

log = logging.getLogger(__name__)

Score = Callable[[float, float], tuple[float, float]]  # (alpha, beta) → (WER, CER)


def tune_weights(
    score: Score,
    alpha_range: tuple[float, float],
    beta_range: tuple[float, float],
    trials: int,
    seed: int,
    start: tuple[float, float] | None = None,
) -> dict:
    """Best (alpha, beta) by (WER, CER) over `trials` TPE trials; returns them with every trial's numbers."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    if start is not None:
        study.enqueue_trial(
            {
                "alpha": min(max(start[0], alpha_range[0]), alpha_range[1]),
                "beta": min(max(start[1], beta_range[0]), beta_range[1]),
            }
        )

    def objective(trial: optuna.Trial) -> float:
        alpha = trial.suggest_float("alpha", *alpha_range)
        beta = trial.suggest_float("beta", *beta_range)
        wer, cer = score(alpha, beta)
        trial.set_user_attr("cer", cer)
        return wer

    study.optimize(objective, n_trials=trials)
    done = [t for t in study.trials if t.value is not None]
    best = min(done, key=lambda t: (t.value, t.user_attrs["cer"], t.number))
    return {
        "alpha": best.params["alpha"],
        "beta": best.params["beta"],
        "wer": best.value,
        "cer": best.user_attrs["cer"],
        "trial": best.number,
        "trials": [{"number": t.number, **t.params, "wer": t.value, "cer": t.user_attrs["cer"]} for t in done],
    }


def decoding_score(decoder: CTCDecoder, log_probs: list, references: list[str]) -> Score:
    def score(alpha: float, beta: float) -> tuple[float, float]:
        decoder.set_weights(alpha, beta)
        hypotheses = [decoder.decode(lp) for lp in log_probs]
        rates = error_rates(references, hypotheses)
        return rates["wer"], rates["cer"]

    return score


def tune_decoder(decoder: CTCDecoder, log_probs: list, references: list[str], cfg: DictConfig, split: str) -> dict:
    """Tune on one split's logits, write alpha/beta into the LM's lm.json; returns the study's summary."""
    info = decoder.lm_info
    start = (decoder.beam.alpha, decoder.beam.beta)
    result = tune_weights(
        decoding_score(decoder, log_probs, references),
        tuple(cfg.alpha_range),
        tuple(cfg.beta_range),
        cfg.trials,
        cfg.seed,
        start,
    )
    decoder.set_weights(result["alpha"], result["beta"])
    info.update(
        alpha=result["alpha"],
        beta=result["beta"],
        tuned={
            "split": split,
            "utterances": len(references),
            "trials": cfg.trials,
            "seed": cfg.seed,
            "wer": result["wer"],
            "cer": result["cer"],
            "start": {"alpha": start[0], "beta": start[1]},
            "beam_width": decoder.beam.beam_width,
        },
    )
    Path(decoder.lm_dir, INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info(
        "Tuned on %s (%d utterances, %d trials): alpha %.3f, beta %.3f → WER %.4f, CER %.4f; saved in %s",
        split,
        len(references),
        cfg.trials,
        result["alpha"],
        result["beta"],
        result["wer"],
        result["cer"],
        Path(decoder.lm_dir, INFO_FILE),
    )
    return result
