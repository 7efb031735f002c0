"""lm.after_training=true: a training run also decodes its test split with an n-gram LM.

After the model is saved: build the LM from the train split's transcripts into `model/lm/`,
tune alpha/beta on the dev logits, decode the test logits with it. The run's metrics gain
`test_lm_wer`/`test_lm_cer` beside the greedy `test_wer`/`test_cer` (metrics.json, MLflow,
`make compare`), and the model folder carries the LM, so `asr.transcribe` uses it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import DatasetDict
from omegaconf import DictConfig

from asr.inference import write_predictions
from asr.lm import lm_dir_of
from asr.lm.build import build_lm, check_test_overlap, lmplz_for, normalized_lines
from asr.lm.decode import BeamSettings, CTCDecoder
from asr.lm.logits import cached_log_probs
from asr.lm.tune import tune_decoder
from asr.metrics import error_rates
from asr.report import default_bootstrap, paired_rates

log = logging.getLogger(__name__)


def _references(tokenizer, split) -> list[str]:
    return tokenizer.batch_decode(split["labels"], group_tokens=False)  # as the Trainer's metrics see them


def _lm_text(cfg: DictConfig, features: DatasetDict) -> list[str]:
    if cfg.lm.text_file:
        return normalized_lines(cfg.lm.text_file, cfg.dataset.text)
    return [text for text in features["train"]["text"] if text]


def _test_texts(features: DatasetDict) -> list[str]:
    return [text for text in features["test"]["text"] if text]


def check_before_training(cfg: DictConfig, features: DatasetDict) -> None:
    """lm.after_training=true: what would make the LM step refuse (no lmplz, a bad order, a missing or empty
    text, test sentences in it) is a one-line error before training, not after hours of it."""
    if not cfg.lm.after_training:
        return
    lmplz_for(cfg.lm)
    check_test_overlap(_lm_text(cfg, features), _test_texts(features), cfg.lm.test_overlap)


def decode_test_with_lm(cfg: DictConfig, output_dir: Path, model, features: DatasetDict, processor) -> dict[str, float]:
    """Build → tune on dev → decode test; returns the test_lm_* metrics and writes predictions_test_lm.jsonl."""
    model_dir, tokenizer, batch = output_dir / "model", processor.tokenizer, cfg.trainer.eval_batch_size
    source = cfg.lm.text_file or "train split transcripts"
    build_lm(_lm_text(cfg, features), lm_dir_of(model_dir), cfg.lm, source, _test_texts(features))
    model.eval()
    logits = {
        name: cached_log_probs(model_dir, model, processor, features[name], name, cfg.paths.cache_dir, batch)[0]
        for name in ("dev", "test")
    }
    decoder = CTCDecoder(
        "beam_lm", tokenizer, model.config.vocab_size, lm_dir_of(model_dir), BeamSettings.from_config(cfg.lm)
    )
    tuned = tune_decoder(decoder, logits["dev"], _references(tokenizer, features["dev"]), cfg.lm.tune, "dev")

    references = _references(tokenizer, features["test"])
    hypotheses, seconds = decoder.decode_all(logits["test"])
    greedy = CTCDecoder("greedy", tokenizer, model.config.vocab_size).decode_all(logits["test"])[0]
    rates = error_rates(references, hypotheses)
    versus = paired_rates(
        references, greedy, hypotheses, list(features["test"]["speaker"]), cfg.get("bootstrap") or default_bootstrap()
    )
    write_predictions(
        output_dir / "predictions_test_lm.jsonl",
        features["test"]["id"],
        features["test"]["speaker"],
        references,
        hypotheses,
    )
    log.info(
        "test with the LM: WER %.4f, CER %.4f (alpha %.3f, beta %.3f); against greedy: %s",
        rates["wer"],
        rates["cer"],
        tuned["alpha"],
        tuned["beta"],
        versus["wer"]["verdict"],
    )
    return {
        "test_lm_wer": rates["wer"],
        "test_lm_cer": rates["cer"],
        "test_lm_alpha": tuned["alpha"],
        "test_lm_beta": tuned["beta"],
        "dev_lm_wer": tuned["wer"],
        "test_lm_wer_minus_greedy": versus["wer"]["difference"],
        "test_lm_wer_p_value": versus["wer"]["p_value"],
        "test_lm_decode_seconds_per_utterance": seconds,
    }
