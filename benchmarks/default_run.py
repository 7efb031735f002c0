"""The default run (`python train.py`) before and after a change of defaults: wall time and test WER/CER.

    .venv/bin/python benchmarks/default_run.py                     # 2 rounds, ~17 min on 2 cores
    .venv/bin/python benchmarks/default_run.py --rounds 3 --seeds 42 7

Two arms, each the whole `python train.py` command in a fresh process (imports, corpus and feature
cache look-up, training, evaluations, test split, MLflow logging), timed from start to exit:

- `before`: today's command with overrides that restore the defaults of `trainer=cpu` before
  2026-11-28 (10 epochs of 8 random utterances, cosine lr 3e-3 after 50 warm-up steps, dev
  evaluation every 200 steps): `BEFORE` below.
- `now`: `python train.py` as typed, with the defaults in conf/.

The arms alternate (before, now, then now, before, ...) so a slow stretch of the machine hits
both. Run `make train` once first: the corpus and its features must be cached, as in a second
`make train`. Every run has its own `hydra.run.dir` under --out and files its MLflow run in its
own store there (`tracking.uri`), so the benchmark leaves your `mlflow.db` alone.

Printed: the machine (cores, CPU model, load average before and after), each run's wall time and
test WER/CER, the median over rounds of the per-round wall-time ratio now/before, and, for each
seed, the paired bootstrap of the test transcripts of a `before` run against a `now` run of the
same seed (`python -m asr.evaluate 'compare=[<before>,<now>]'`): "B better", "A better" or "no
significant difference", B being the new defaults. Results also go to <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# trainer=cpu's defaults before 2026-11-28, restored over whatever conf/trainer/cpu.yaml says now
BEFORE = [
    "trainer.epochs=10",
    "trainer.max_steps=null",
    "trainer.lr=3e-3",
    "trainer.lr_scheduler=cosine",
    "trainer.warmup_steps=50",
    "trainer.batch_size=8",
    "trainer.batch_seconds=null",
    "trainer.pad_to_multiple_of=null",
    "trainer.bucket_edges_seconds=null",
    "trainer.eval_steps=200",
    "trainer.optim=adamw_torch",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train(arm: str, overrides: list[str], seed: int, run_dir: Path, store: Path) -> dict:
    """One whole `python train.py` in a fresh process: its wall time and metrics.json."""
    cmd = [
        sys.executable,
        "train.py",
        *overrides,
        f"seed={seed}",
        f"hydra.run.dir={run_dir}",
        f"tracking.uri=sqlite:///{store}",
        "tracking.experiment=benchmark-default-run",
    ]
    log = run_dir.with_suffix(".log")
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{arm} run failed (exit {done.returncode}); its log: {log}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "arm": arm,
        "seed": seed,
        "run_dir": str(run_dir),
        "wall_s": wall,
        "train_runtime_s": metrics["train_runtime"],
        "steps": metrics["train_steps"],
        "test_wer": metrics["test_wer"],
        "test_cer": metrics["test_cer"],
        "best_eval_wer": metrics.get("eval_wer"),
        "best_eval_cer": metrics.get("eval_cer"),
        "padding_fraction": metrics.get("train_padding_fraction"),
    }


def paired(before_dir: str, now_dir: str, out: Path) -> dict:
    """asr.evaluate's paired bootstrap of two runs' test transcripts (A = before, B = now)."""
    cmd = [sys.executable, "-m", "asr.evaluate", f"compare=[{before_dir},{now_dir}]", f"hydra.run.dir={out}"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads((out / "compare.json").read_text())
    return {"wer": result["wer"]["verdict"], "cer": result["cer"]["verdict"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs both arms once")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[42], help="seed of each round, cycled (42 = the default)"
    )
    parser.add_argument("--now", nargs="*", default=[], help="overrides for the `now` arm (none = the defaults)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "outputs" / "benchmark-default-run", help="run folders and results.json"
    )
    args = parser.parse_args()
    out = args.out.resolve() / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True)
    store = out / "mlflow.db"
    arms = {"before": BEFORE, "now": list(args.now)}
    load_start = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} cores, {cpu_model()}; load average {load_start[0]:.2f} {load_start[1]:.2f}",
        flush=True,
    )
    print(f"before = python train.py {' '.join(BEFORE)}\nnow    = python train.py {' '.join(args.now)}", flush=True)
    runs: list[dict] = []
    for round_index in range(args.rounds):
        seed = args.seeds[round_index % len(args.seeds)]
        order = ["before", "now"] if round_index % 2 == 0 else ["now", "before"]
        for arm in order:
            run = train(arm, arms[arm], seed, out / f"r{round_index}-{arm}-seed{seed}", store)
            run["round"] = round_index
            runs.append(run)
            print(
                f"round {round_index} {arm:6s} seed {seed}: {run['wall_s']:6.1f} s wall ({run['steps']} steps, "
                f"training {run['train_runtime_s']:.1f} s), test WER {run['test_wer']:.4f} CER {run['test_cer']:.4f}",
                flush=True,
            )
    ratios = []
    for round_index in range(args.rounds):
        wall = {r["arm"]: r["wall_s"] for r in runs if r["round"] == round_index}
        ratios.append(wall["now"] / wall["before"])
    comparisons = {}
    for seed in dict.fromkeys(r["seed"] for r in runs):
        first = {r["arm"]: r["run_dir"] for r in reversed(runs) if r["seed"] == seed}
        comparisons[seed] = paired(first["before"], first["now"], out / f"compare-seed{seed}")
    load_end = os.getloadavg()
    summary = {
        "machine": {"cores": os.cpu_count(), "cpu": cpu_model()},
        "load_average_start": load_start,
        "load_average_end": load_end,
        "before_overrides": BEFORE,
        "now_overrides": args.now,
        "runs": runs,
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "paired": {str(k): v for k, v in comparisons.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print()
    for arm in ("before", "now"):
        mine = [r for r in runs if r["arm"] == arm]
        wers = ", ".join(f"{r['test_wer']:.4f}" for r in mine)
        cers = ", ".join(f"{r['test_cer']:.4f}" for r in mine)
        wall = statistics.median(r["wall_s"] for r in mine)
        print(f"{arm:6s}: median wall {wall:6.1f} s; test WER {wers}; CER {cers}")
    print(f"wall time now/before: {summary['ratio']:.3f} (median of rounds {', '.join(f'{r:.3f}' for r in ratios)})")
    for seed, verdicts in comparisons.items():
        print(f"paired bootstrap, seed {seed}, A = before, B = now: {verdicts['wer']} | {verdicts['cer']}")
    print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f}; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
