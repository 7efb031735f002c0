"""Score a trained model, or compare two scored runs, with intervals that say how sure we are.

    python -m asr.evaluate run_dir=outputs/<date>/<time> [split=dev] [decoder=greedy|beam|beam_lm]
    python -m asr.evaluate 'compare=[<folder A>,<folder B>]'
(see conf/evaluate.yaml). Results go to a new folder and to a new MLflow run tagged
`evaluates_run_id=<training run>`, so the training run stays exactly as it was logged.
The split's logits are saved once (asr.lm.logits); beam decoders are compared with greedy
decoding on the same utterances (paired bootstrap).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import asr  # noqa: F401  (registers ${repo_dir:})
from asr import cli
from asr.errors import ConfigError
from asr.lm.decode import CTCDecoder, build_decoder
from asr.lm.logits import cached_log_probs
from asr.report import build_report, paired_comparison, paired_rates, write_report
from asr.scoring import scoring_split
from asr.tracking import MlflowRun

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, output_dir: Path) -> dict:
    """Decode `cfg.split` with `cfg.decoder`, report it (and, for a beam decoder, against greedy decoding of
    the same logits), and record it in a new MLflow run tagged with the training run it evaluates."""
    scored = scoring_split(cfg, cfg.split, output_dir)
    model, processor, split, refs = scored.model, scored.processor, scored.split, scored.references
    model_dir = scored.source.model_dir
    log_probs, _ = cached_log_probs(model_dir, model, processor, split, cfg.split, cfg.paths.cache_dir, cfg.batch_size)
    decoder = build_decoder(cfg.decoder, cfg.lm, processor.tokenizer, model.config.vocab_size, model_dir)
    hyps, seconds = decoder.decode_all(log_probs)
    report = build_report(split["id"], split["speaker"], refs, hyps, cfg)
    report["source"] = {
        "model_dir": str(model_dir),
        "split": cfg.split,
        "dataset": scored.source.dataset.name,
        "training_run": scored.source.train_run_id,
    }
    report["decoding"] = {**decoder.describe(), "seconds_per_utterance": seconds}
    if decoder.kind != "greedy":  # the same logits decoded greedily: does the beam (and LM) really help?
        greedy = CTCDecoder("greedy", processor.tokenizer, model.config.vocab_size).decode_all(log_probs)[0]
        report["versus_greedy"] = paired_rates(refs, greedy, hyps, split["speaker"], cfg.bootstrap)
    write_report(output_dir, cfg.split, report, split, refs, hyps)
    _record(cfg, report, output_dir, decoder.kind, scored.source.train_run_id)
    b = report["bootstrap"]
    log.info(
        "%s WER %.4f [%.4f, %.4f], CER %.4f (%s decoding) → %s",
        cfg.split,
        report["wer"],
        *b["wer_ci95"],
        report["cer"],
        decoder.kind,
        output_dir / "report.md",
    )
    if "versus_greedy" in report:
        verdict = report["versus_greedy"]["wer"]["verdict"]
        log.info("%s versus greedy (A = greedy, B = %s): %s", cfg.split, decoder.kind, verdict)
    return report


def _record(cfg: DictConfig, report: dict, output_dir: Path, decoder: str, train_run_id: str | None) -> None:
    """The evaluation as its own MLflow run: rates, interval, decoding time, the report files."""
    split = cfg.split
    tracker = MlflowRun(
        cfg.tracking,
        f"evaluate {split}: {report['source']['model_dir']}",
        {"evaluates_run_id": train_run_id or "", "split": split, "decoder": decoder},
    )
    metrics = {f"{split}_{k}": report[k] for k in ("wer", "cer", "substitutions", "deletions", "insertions")}
    metrics[f"{split}_decode_seconds_per_utterance"] = report["decoding"]["seconds_per_utterance"]
    if "versus_greedy" in report:
        metrics[f"{split}_wer_minus_greedy"] = report["versus_greedy"]["wer"]["difference"]
    metrics[f"{split}_wer_ci95_low"], metrics[f"{split}_wer_ci95_high"] = report["bootstrap"]["wer_ci95"]
    tracker.log_metrics(metrics, step=0)
    for name in ("report.json", "report.md", f"predictions_{split}.jsonl"):
        tracker.log_artifact(output_dir / name)
    tracker.end("FINISHED")


def compare(cfg: DictConfig, output_dir: Path) -> dict:
    if len(cfg.compare) != 2:
        raise ConfigError(f"compare takes two folders, got {len(cfg.compare)}. Fix: 'compare=[<folder A>,<folder B>]'")
    folder_a, folder_b = (Path(p) for p in cfg.compare)
    result = paired_comparison(folder_a, folder_b, cfg.split, cfg.bootstrap)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"A = {folder_a}\nB = {folder_b}\n{result['wer']['verdict']}\n{result['cer']['verdict']}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with cli.user_errors():
        if cfg.compare:
            return compare(cfg, output_dir)["wer"]["difference"]
        return evaluate(cfg, output_dir)["wer"]


def entry() -> None:
    """`python -m asr.evaluate` and the `asr-evaluate` command."""
    cli.run(main)


if __name__ == "__main__":
    entry()
