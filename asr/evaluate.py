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
import numpy as np
from hydra.core.hydra_config import HydraConfig
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict

import asr  # noqa: F401  (registers ${repo_dir:})
from asr import cli
from asr.audit import run_audit
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
from asr.inference import load_model, read_predictions, write_predictions
from asr.lm.decode import CTCDecoder, build_decoder
from asr.lm.logits import cached_log_probs
from asr.metrics import error_rates
from asr.prepare import features_for, load_normalised
from asr.tracking import MlflowRun, tracking_uri

log = logging.getLogger(__name__)


def resolve_source(cfg: DictConfig) -> tuple[Path, DictConfig, DictConfig, str | None]:
    """Model folder, dataset and audit configs and training run id from run_dir | mlflow_run | model_dir."""
    train_run_id, run_dir = None, None
    if cfg.mlflow_run:
        run_dir, train_run_id = _run_folder_of(cfg.mlflow_run, cfg.tracking.uri), cfg.mlflow_run
    elif cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    if run_dir is not None:
        config = run_dir / ".hydra" / "config.yaml"
        if not config.is_file() or not (run_dir / "model").is_dir():
            raise ConfigError(
                f"{run_dir} is not a finished training run (no .hydra/config.yaml or model/). "
                "Fix: run_dir=<a train.py run folder>, e.g. outputs/<date>/<time>"
            )
        train_cfg = OmegaConf.load(config)
        record = run_dir / "mlflow_run.json"
        train_run_id = train_run_id or (json.loads(record.read_text())["run_id"] if record.is_file() else None)
        return (
            run_dir / "model",
            cfg.get("dataset") or train_cfg.dataset,
            train_cfg.get("audit") or cfg.audit,
            train_run_id,
        )
    if cfg.model_dir and cfg.get("dataset"):
        if not Path(cfg.model_dir).is_dir():
            raise ConfigError(
                f"model_dir={cfg.model_dir} does not exist. Fix: a folder saved by train.py (<run folder>/model)"
            )
        return Path(cfg.model_dir), cfg.dataset, cfg.audit, None
    if cfg.model_dir:
        raise ConfigError(
            "model_dir= needs the data to score it on. Fix: add dataset=<name> and its settings, "
            "e.g. dataset=manifest dataset.train=... dataset.test=..."
        )
    raise ConfigError(
        "nothing to evaluate. Fix: run_dir=<training run folder>, mlflow_run=<run id>, "
        "or model_dir=<model folder> dataset=<name> (see conf/evaluate.yaml)"
    )


def _run_folder_of(run_id: str, uri: str | None) -> Path:
    """The output folder of a training run, found through its MLflow run."""
    client = MlflowClient(tracking_uri(uri))
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            f"no MLflow run {run_id} in {client.tracking_uri}. Fix: copy the id from the UI or "
            "mlflow_run.json, and set MLFLOW_TRACKING_URI (or tracking.uri) to the store that has it"
        ) from err
    if "output_dir" not in run.data.tags:
        raise ConfigError(
            f"MLflow run {run_id} is not a training run of this project (no output_dir tag). "
            "Fix: pick the training run, or use model_dir=<folder> dataset=<name>"
        )
    return Path(run.data.tags["output_dir"])


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


def scoring_split(cfg: DictConfig, split_name: str, output_dir: Path):
    """(model_dir, dataset config, training run id, model, processor, audited split, references), as training
    scored it."""
    model_dir, dataset_cfg, audit_cfg, train_run_id = resolve_source(cfg)
    with open_dict(cfg):  # the evaluation is filed in the training run's experiment (asr-${dataset.name})
        cfg.dataset = dataset_cfg
    splits = load_normalised(dataset_cfg)
    model, processor = load_model(model_dir)
    features = features_for(splits, processor, dataset_cfg, cfg.paths.cache_dir, only=(split_name,))
    split = run_audit(
        features,
        audit_cfg,
        model.config,
        output_dir / "data_audit.json",  # as training scored it
        allow_missing=dataset_cfg.get("allow_missing_audio", False),
    )[0][split_name]
    # References as training scored them: the labels decoded (characters outside the train vocabulary → [UNK]).
    refs = processor.tokenizer.batch_decode(split["labels"], group_tokens=False)
    return model_dir, dataset_cfg, train_run_id, model, processor, split, refs


def evaluate(cfg: DictConfig, output_dir: Path) -> dict:
    model_dir, dataset_cfg, train_run_id, model, processor, split, refs = scoring_split(cfg, cfg.split, output_dir)
    log_probs, _ = cached_log_probs(model_dir, model, processor, split, cfg.split, cfg.paths.cache_dir, cfg.batch_size)
    decoder = build_decoder(cfg.decoder, cfg.lm, processor.tokenizer, model.config.vocab_size, model_dir)
    hyps, seconds = decoder.decode_all(log_probs)
    report = build_report(split["id"], split["speaker"], refs, hyps, cfg)
    report["source"] = {
        "model_dir": str(model_dir),
        "split": cfg.split,
        "dataset": dataset_cfg.name,
        "training_run": train_run_id,
    }
    report["decoding"] = {**decoder.describe(), "seconds_per_utterance": seconds}
    if decoder.kind != "greedy":  # the same logits decoded greedily: does the beam (and LM) really help?
        greedy = CTCDecoder("greedy", processor.tokenizer, model.config.vocab_size).decode_all(log_probs)[0]
        report["versus_greedy"] = paired_rates(refs, greedy, hyps, split["speaker"], cfg.bootstrap)
    _write(output_dir, cfg.split, report, split, refs, hyps)

    tracker = MlflowRun(
        cfg.tracking,
        f"evaluate {cfg.split}: {model_dir}",
        {"evaluates_run_id": train_run_id or "", "split": cfg.split, "decoder": decoder.kind},
    )
    tracker.log_metrics(
        {f"{cfg.split}_{k}": report[k] for k in ("wer", "cer", "substitutions", "deletions", "insertions")}, step=0
    )
    tracker.log_metrics({f"{cfg.split}_decode_seconds_per_utterance": seconds}, step=0)
    if "versus_greedy" in report:
        tracker.log_metrics({f"{cfg.split}_wer_minus_greedy": report["versus_greedy"]["wer"]["difference"]}, step=0)
    tracker.log_metrics(
        {
            f"{cfg.split}_wer_ci95_low": report["bootstrap"]["wer_ci95"][0],
            f"{cfg.split}_wer_ci95_high": report["bootstrap"]["wer_ci95"][1],
        },
        step=0,
    )
    for name in ("report.json", "report.md", f"predictions_{cfg.split}.jsonl"):
        tracker.log_artifact(output_dir / name)
    tracker.end("FINISHED")
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
        log.info(
            "%s versus greedy (A = greedy, B = %s): %s",
            cfg.split,
            decoder.kind,
            report["versus_greedy"]["wer"]["verdict"],
        )
    return report


def _write(output_dir: Path, split_name: str, report: dict, split, refs: list[str], hyps: list[str]) -> None:
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
