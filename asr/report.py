"""A scored split as a report (WER/CER with bootstrap intervals, per speaker, worst utterances, character
confusions) and the paired bootstrap of two transcriptions of the same utterances. Library code: the
`asr.evaluate` command, the LM step after training and `make compare` all report through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from asr.bootstrap import (
    bootstrap_rates,
    char_confusions,
    confidence_interval,
    paired_difference,
    per_speaker,
    utterance_counts,
    verdict,
)
from asr.errors import ConfigError
from asr.inference import read_predictions, write_predictions
from asr.metrics import error_rates
from asr.paths import REPO_DIR


def default_bootstrap() -> DictConfig:
    """The bootstrap settings of conf/evaluate.yaml, for reports made outside `asr.evaluate`."""
    return OmegaConf.load(REPO_DIR / "conf" / "evaluate.yaml").bootstrap


def bootstrap_groups(speakers: list[str], unit: str) -> tuple[str, list[str] | None]:
    if unit == "speaker" or (unit == "auto" and all(speakers) and len(set(speakers)) > 1):
        return "speaker", speakers
    return "utterance", None


def build_report(ids: list[str], speakers: list[str], refs: list[str], hyps: list[str], cfg: DictConfig) -> dict:
    counts = utterance_counts(refs, hyps)
    unit, groups = bootstrap_groups(speakers, cfg.bootstrap.unit)
    boot = {"unit": unit, "resamples": cfg.bootstrap.resamples, "seed": cfg.bootstrap.seed}
    for name, errors, lengths in (("wer", "word_errors", "words"), ("cer", "char_errors", "chars")):
        samples = bootstrap_rates(counts[errors], counts[lengths], groups, cfg.bootstrap.resamples, cfg.bootstrap.seed)
        boot[f"{name}_ci95"] = confidence_interval(samples)
    rates = error_rates(refs, hyps)
    utterance_wer = counts["word_errors"] / np.maximum(counts["words"], 1)
    worst = np.argsort(-utterance_wer, kind="stable")[: cfg.report.worst]
    return {
        "utterances": len(refs),
        "words": int(counts["words"].sum()),
        **rates,
        "hits": int(counts["words"].sum() - rates["substitutions"] - rates["deletions"]),
        "bootstrap": boot,
        "per_speaker": per_speaker(speakers, counts) if all(speakers) else [],
        "worst": [
            {"id": ids[i], "wer": float(utterance_wer[i]), "reference": refs[i], "hypothesis": hyps[i]} for i in worst
        ],
        "confusions": char_confusions(refs, hyps, cfg.report.confusions),
    }


def report_markdown(report: dict, title: str) -> str:
    b = report["bootstrap"]
    lines = [
        f"# {title}",
        "",
        f"{report['utterances']} utterances, {report['words']} words.",
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
        f"| WER | {report['wer']:.4f} | [{b['wer_ci95'][0]:.4f}, {b['wer_ci95'][1]:.4f}] |",
        f"| CER | {report['cer']:.4f} | [{b['cer_ci95'][0]:.4f}, {b['cer_ci95'][1]:.4f}] |",
        "",
        f"Words: {report['hits']} hits, {report['substitutions']} substitutions, {report['deletions']} deletions, "
        f"{report['insertions']} insertions. Intervals: {b['resamples']} bootstrap resamples of "
        f"{b['unit']}s (seed {b['seed']}).",
        "",
    ]
    if "decoding" in report:
        lines += [
            "Decoding: "
            + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report["decoding"].items()),
            "",
        ]
    if "versus_greedy" in report:
        lines += [
            "Against greedy decoding of the same logits (A = greedy, B = this decoder): "
            f"{report['versus_greedy']['wer']['verdict']}; "
            f"{report['versus_greedy']['cer']['verdict']}",
            "",
        ]
    if report["per_speaker"]:
        lines += ["## WER per speaker (worst first)", "", "| speaker | utterances | words | WER |", "|---|---|---|---|"]
        lines += [
            f"| {r['speaker']} | {r['utterances']} | {r['words']} | {r['wer']:.4f} |" for r in report["per_speaker"]
        ] + [""]
    lines += ["## Worst utterances", "", "| id | WER | reference | hypothesis |", "|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['wer']:.2f} | {r['reference']} | {r['hypothesis']} |" for r in report["worst"]] + [""]
    lines += [
        "## Most frequent character confusions (∅ = nothing)",
        "",
        "| reference | hypothesis | count |",
        "|---|---|---|",
    ]
    lines += [f"| {r['reference']} | {r['hypothesis']} | {r['count']} |" for r in report["confusions"]]
    return "\n".join(lines) + "\n"


def write_report(output_dir: Path, split_name: str, report: dict, split, refs: list[str], hyps: list[str]) -> None:
    """report.json, report.md and predictions_<split>.jsonl in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (output_dir / "report.md").write_text(
        report_markdown(report, f"{report['source']['dataset']} / {split_name}"), encoding="utf-8"
    )
    write_predictions(output_dir / f"predictions_{split_name}.jsonl", split["id"], split["speaker"], refs, hyps)


def paired_comparison(folder_a: Path, folder_b: Path, split: str, bootstrap: DictConfig) -> dict:
    """Paired bootstrap on the utterances both runs transcribed: is B better than A?"""
    a, b = read_predictions(folder_a, split), read_predictions(folder_b, split)
    if set(a) != set(b) or any(a[i]["reference"] != b[i]["reference"] for i in a):
        raise ConfigError(
            f"{folder_a} and {folder_b} did not transcribe the same utterances with the same references. "
            "Fix: compare two runs evaluated on one split of one dataset"
        )
    ids = sorted(a)
    paired = paired_rates(
        [a[i]["reference"] for i in ids],
        [a[i]["hypothesis"] for i in ids],
        [b[i]["hypothesis"] for i in ids],
        [a[i].get("speaker", "") for i in ids],
        bootstrap,
    )
    return {"a": str(folder_a), "b": str(folder_b), "split": split, **paired}


def paired_rates(
    refs: list[str], hyps_a: list[str], hyps_b: list[str], speakers: list[str], bootstrap: DictConfig
) -> dict:
    """Paired bootstrap of WER and CER: B minus A on the same resampled utterances (or speakers)."""
    counts_a, counts_b = utterance_counts(refs, hyps_a), utterance_counts(refs, hyps_b)
    unit, groups = bootstrap_groups(speakers, bootstrap.unit)
    result = {"utterances": len(refs), "unit": unit, "resamples": bootstrap.resamples, "seed": bootstrap.seed}
    for name, errors, lengths in (("wer", "word_errors", "words"), ("cer", "char_errors", "chars")):
        diff = paired_difference(
            counts_a[errors], counts_b[errors], counts_a[lengths], groups, bootstrap.resamples, bootstrap.seed
        )
        result[name] = {**diff, "verdict": verdict(diff, name.upper())}
    return result
