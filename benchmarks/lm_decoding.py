"""Greedy vs beam search vs beam search + n-gram LM, on the built-in corpus with the default model.

The default run (`python train.py`) is trained unless --run-dir names one; then, as a user would:
`python -m asr.lm build` (trigram LM from the train transcripts), `python -m asr.lm tune` (alpha/beta
on dev logits) and `python -m asr.evaluate decoder=...` on the test split. Printed per decoder: test
WER/CER with 95% bootstrap intervals, the paired bootstrap verdict against greedy decoding of the
same logits, and decoding time per utterance (the forward pass, shared by all, is timed once).

Ablation (does word order matter, or only which words exist?): a second LM from the same train
sentences with the words of each one shuffled, tuned and evaluated the same way, paired against
the LM that kept the order.

    .venv/bin/python benchmarks/lm_decoding.py                         # trains the default model first (minutes)
    .venv/bin/python benchmarks/lm_decoding.py --run-dir outputs/2026-11-28/14-42-56
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import asr  # noqa: F401  (registers ${repo_dir:})
from asr.data import load_splits
from asr.evaluate import evaluate
from asr.lm.__main__ import build, tune
from asr.lm.logits import compute_log_probs
from asr.paths import REPO_DIR
from asr.report import paired_comparison
from asr.scoring import scoring_split

DECODERS = ("greedy", "beam", "beam_lm")


def config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def train_default(folder: Path) -> Path:
    """`python train.py` with every default, into `folder`."""
    subprocess.run([sys.executable, "train.py", f"hydra.run.dir={folder}"], cwd=REPO_DIR, check=True)
    return folder


def shuffled_text(run_dir: Path, path: Path) -> Path:
    """The run's train sentences with the words of each shuffled (seeded): same lexicon, no word order."""
    rng = random.Random(0)
    lines = []
    for text in load_splits(OmegaConf.load(run_dir / ".hydra" / "config.yaml").dataset)["train"]["text"]:
        words = text.split()
        rng.shuffle(words)
        lines.append(" ".join(words))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished default training run (else one is trained)")
    parser.add_argument("--trials", type=int, default=40, help="Optuna trials for alpha/beta (lm.tune.trials)")
    parser.add_argument("--beam-width", type=int, default=32, help="lm.beam_width for both beam decoders")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the reports (default outputs/lm-bench/<time>)"
    )
    args = parser.parse_args()
    out = args.out or REPO_DIR / "outputs" / "lm-bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = (args.run_dir or train_default(out / "run")).resolve()
    common = [f"run_dir={run_dir}", "tracking.experiment=lm-benchmark", f"lm.beam_width={args.beam_width}"]

    started = time.perf_counter()
    info = build(config("language_model", *common, "command=build"), out / "build")
    build_seconds = time.perf_counter() - started
    tuned = tune(config("language_model", *common, "command=tune", f"lm.tune.trials={args.trials}"), out / "tune")

    scored = scoring_split(config("evaluate", *common), "test", out / "forward")
    model, processor, test = scored.model, scored.processor, scored.split
    started = time.perf_counter()
    compute_log_probs(model, processor, test, batch_size=16, desc="Timing the forward pass")
    forward = (time.perf_counter() - started) / len(test)

    reports = {name: evaluate(config("evaluate", *common, f"decoder={name}"), out / name) for name in DECODERS}

    shuffled = [*common, f"lm.path={out / 'lm-shuffled'}"]
    build(
        config(
            "language_model",
            *shuffled,
            "command=build",
            f"out_dir={out / 'lm-shuffled'}",
            f"lm.text_file={shuffled_text(run_dir, out / 'shuffled_train.txt')}",
        ),
        out / "build-shuffled",
    )
    tune(config("language_model", *shuffled, "command=tune", f"lm.tune.trials={args.trials}"), out / "tune-shuffled")
    reports["beam_lm, words shuffled"] = evaluate(
        config("evaluate", *shuffled, "decoder=beam_lm"), out / "beam_lm_shuffled"
    )
    order = paired_comparison(out / "beam_lm_shuffled", out / "beam_lm", "test", config("evaluate").bootstrap)
    print(
        f"\n{datetime.now():%Y-%m-%d}, run {run_dir}: {info['order']}-gram LM from {info['sentences']} train "
        f"sentences ({info['vocabulary']} words, built in {build_seconds:.1f} s); alpha {tuned['alpha']:.3f}, "
        f"beta {tuned['beta']:.3f} tuned on dev in {args.trials} trials; beam width {args.beam_width}; test: "
        f"{reports['greedy']['utterances']} utterances, {reports['greedy']['words']} words. "
        f"Forward pass: {forward * 1000:.1f} ms per utterance (shared).\n"
    )
    print("| decoder | test WER [95% CI] | test CER [95% CI] | decoding ms/utt | against greedy (paired bootstrap) |")
    print("|---|---|---|---|---|")
    for name, report in reports.items():
        b = report["bootstrap"]
        versus = report.get("versus_greedy")
        verdict = f"{versus['wer']['verdict']}; CER {versus['cer']['verdict'].split('CER ')[1]}" if versus else "-"
        milliseconds = report["decoding"]["seconds_per_utterance"] * 1000
        print(
            f"| {name} | {report['wer']:.4f} [{b['wer_ci95'][0]:.4f}, {b['wer_ci95'][1]:.4f}] | {report['cer']:.4f} "
            f"[{b['cer_ci95'][0]:.4f}, {b['cer_ci95'][1]:.4f}] | {milliseconds:.2f} | {verdict} |"
        )
    print(
        f"\nWord order (A = LM from shuffled sentences, B = LM with word order): {order['wer']['verdict']}; "
        f"{order['cer']['verdict']}"
    )
    summary = {
        "word_order": order,
        "run_dir": str(run_dir),
        "lm": info,
        "tuned": {k: tuned[k] for k in ("alpha", "beta", "wer", "cer")},
        "forward_seconds_per_utterance": forward,
        "decoders": {
            name: {k: r[k] for k in ("wer", "cer", "bootstrap", "decoding")} | {"versus_greedy": r.get("versus_greedy")}
            for name, r in reports.items()
        },
    }
    (out / "lm_decoding.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nreports: {out}/<decoder>/report.md; summary: {out / 'lm_decoding.json'}")


if __name__ == "__main__":
    main()
