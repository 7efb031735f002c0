"""python -m asr.lm build|tune [Hydra overrides] — see conf/language_model.yaml and docs/lm.md."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import asr  # noqa: F401  (registers ${repo_dir:})
from asr import cli
from asr.lm import LMError, lm_dir_of
from asr.lm.build import build_lm, normalized_lines
from asr.lm.decode import BeamSettings, CTCDecoder, lm_folder
from asr.lm.logits import cached_log_probs
from asr.metrics import error_rates
from asr.prepare import load_normalised
from asr.scoring import resolve_source, scoring_split
from asr.tracking import MlflowRun

log = logging.getLogger(__name__)
COMMANDS = ("build", "tune")


def _texts(split) -> list[str]:
    return [text for text, rejected in zip(split["text"], split["text_rejected"]) if text and not rejected]


def build(cfg: DictConfig, output_dir: Path) -> dict:
    """The LM text (train transcripts or lm.text_file), checked against the test split, → lmplz → LM folder."""
    model_dir, dataset_cfg, train_run_id = None, cfg.get("dataset"), None
    if cfg.run_dir or cfg.mlflow_run or cfg.model_dir:
        source = resolve_source(cfg)
        model_dir, dataset_cfg, train_run_id = source.model_dir, source.dataset, source.train_run_id
    elif not (cfg.lm.text_file and cfg.out_dir and dataset_cfg):
        raise LMError(
            "nothing to build from. Fix: run_dir=<training run> (its train transcripts), or "
            "dataset=<name> lm.text_file=<text> out_dir=<folder> (see conf/language_model.yaml)"
        )
    with open_dict(cfg):  # the build is filed in the training run's experiment (asr-${dataset.name})
        cfg.dataset = dataset_cfg
    out_dir = Path(cfg.out_dir) if cfg.out_dir else lm_dir_of(model_dir)
    splits = load_normalised(dataset_cfg)
    if cfg.lm.text_file:
        lines, source = normalized_lines(cfg.lm.text_file, dataset_cfg.text), str(cfg.lm.text_file)
    else:
        lines, source = _texts(splits["train"]), f"train split of {dataset_cfg.name}"
    tracker = MlflowRun(
        cfg.tracking, f"lm build: {out_dir}", {"lm_for_run_id": train_run_id or "", "lm_command": "build"}
    )
    try:
        info = build_lm(lines, out_dir, cfg.lm, source, _texts(splits["test"]))
        tracker.log_config(cfg)
        tracker.log_metrics(
            {f"lm_{k}": info[k] for k in ("sentences", "words", "vocabulary", "test_overlap", "build_seconds")}, step=0
        )
        files = ["lm.json", "unigrams.txt"] + (["lm.arpa", "lm.bin"] if cfg.lm.log_files else [])
        for name in files:
            tracker.log_artifact(out_dir / name)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return info


def tune(cfg: DictConfig, output_dir: Path) -> dict:
    """alpha/beta on the dev split's saved logits; the result goes into the LM's lm.json."""
    split_name = cfg.lm.tune.split
    if split_name == "test":
        raise LMError(
            "lm.tune.split=test: weights tuned on the test split make its WER meaningless. Fix: lm.tune.split=dev"
        )
    scored = scoring_split(cfg, split_name, output_dir)
    model, processor, split, refs = scored.model, scored.processor, scored.split, scored.references
    model_dir, train_run_id = scored.source.model_dir, scored.source.train_run_id
    log_probs, _ = cached_log_probs(model_dir, model, processor, split, split_name, cfg.paths.cache_dir, cfg.batch_size)
    from asr.lm.tune import tune_decoder  # optuna is imported by the tuner only

    decoder = CTCDecoder(
        "beam_lm",
        processor.tokenizer,
        model.config.vocab_size,
        lm_folder(cfg.lm, model_dir),
        BeamSettings.from_config(cfg.lm),
    )
    greedy = CTCDecoder("greedy", processor.tokenizer, model.config.vocab_size)
    greedy_rates = error_rates(refs, greedy.decode_all(log_probs)[0])
    tracker = MlflowRun(
        cfg.tracking, f"lm tune: {decoder.lm_dir}", {"lm_for_run_id": train_run_id or "", "lm_command": "tune"}
    )
    try:
        result = tune_decoder(decoder, log_probs, refs, cfg.lm.tune, split_name)
        result["greedy"] = {"wer": greedy_rates["wer"], "cer": greedy_rates["cer"]}
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "tune.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        tracker.log_config(cfg)
        tracker.log_metrics(
            {
                "lm_alpha": result["alpha"],
                "lm_beta": result["beta"],
                f"{split_name}_lm_wer": result["wer"],
                f"{split_name}_lm_cer": result["cer"],
                f"{split_name}_greedy_wer": greedy_rates["wer"],
            },
            step=0,
        )
        tracker.log_artifact(output_dir / "tune.json")
        tracker.log_artifact(decoder.lm_dir / "lm.json")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    print(
        f"{split_name}: greedy WER {greedy_rates['wer']:.4f} → beam + LM WER {result['wer']:.4f} "
        f"(alpha {result['alpha']:.3f}, beta {result['beta']:.3f}, saved in {decoder.lm_dir / 'lm.json'})"
    )
    return result


@hydra.main(version_base="1.3", config_path="../../conf", config_name="language_model")
def _hydra_main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with cli.user_errors():  # LMError and the project's other user errors: one line, exit 1
        (build if cfg.command == "build" else tune)(cfg, output_dir)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        cli.fail(
            "python -m asr.lm needs a command first. Fix: python -m asr.lm build|tune [key=value ...] "
            "(see conf/language_model.yaml)",
            cli.BAD_COMMAND_LINE,
        )
    sys.argv.insert(1, f"command={sys.argv.pop(1)}")
    cli.run(_hydra_main)


if __name__ == "__main__":
    main()
