"""Grid search vs TPE + median pruning, at equal trial count, on the built-in corpus.

Both studies search the same learning rate x warm-up box with the tiny model; the grid runs
every trial to the end, TPE proposes points from the results so far and the median pruner
stops trials whose eval WER trails the median at the same step. Printed, from this one run:
total compute (optimizer steps summed over trials), best eval WER, and the compute TPE needed
to first match the grid's best WER, as a share of the grid's compute.

    .venv/bin/python benchmarks/sweep_pruning.py                 # 12 + 12 trials, 2 workers (~30 min on 2 cores)
    .venv/bin/python benchmarks/sweep_pruning.py --trials 6 --epochs 2   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir

import asr  # noqa: F401  (registers ${repo_dir:})
from asr.paths import REPO_DIR
from asr.sweep import run_study
from asr.sweep.report import leaderboard
from asr.sweep.spec import spec_from_config

LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
WARMUPS = [0, 200]

GRID = f"""sampler:
  name: grid
pruner:
  name: none
n_trials: null
params:
  trainer.lr: choice({", ".join(map(str, LRS))})
  trainer.warmup_steps: choice({", ".join(map(str, WARMUPS))})
"""
TPE = f"""sampler:
  name: tpe
  n_startup_trials: 4
pruner:
  name: median
  warmup_evals: 2
  n_startup_trials: 2
params:
  trainer.lr: tag(log, interval({LRS[0]}, {LRS[-1]}))
  trainer.warmup_steps: int(interval({WARMUPS[0]}, {WARMUPS[-1]}))
"""


def run(name: str, body: str, args, root: Path) -> dict:
    conf = root / "conf"
    (conf / "sweep").mkdir(parents=True, exist_ok=True)
    (conf / "sweep" / f"{name}.yaml").write_text("defaults:\n  - /shared/sweep@_here_\n  - _self_\n" + body)
    overrides = [
        f"hydra.searchpath=[file://{conf}]",
        f"sweep={name}",
        f"sweep.study_name={name}-{args.stamp}",
        f"sweep.dir={args.out / f'{name}-{args.stamp}'}",
        "sweep.export_dir=null",
        f"sweep.workers={args.workers}",
        f"sweep.n_trials={args.trials}",
        f"trainer.epochs={args.epochs}",
        f"trainer.eval_steps={args.eval_steps}",
        "tracking.experiment=benchmark-sweep-pruning",
    ]
    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base="1.3"):
        cfg = compose("study", overrides=overrides)
    spec = spec_from_config(cfg, overrides)
    started = time.perf_counter()
    study = run_study(spec)
    minutes = (time.perf_counter() - started) / 60
    table = leaderboard(study).sort_values("trial")
    return {
        "study": name,
        "trials": len(table),
        "pruned": int((table["state"] == "PRUNED").sum()),
        "steps": [int(s) for s in table["steps"]],
        "values": [None if v != v else v for v in table["value"]],
        "states": list(table["state"]),
        "best": float(study.best_value),
        "minutes": round(minutes, 1),
    }


def steps_to_reach(result: dict, target: float) -> int | None:
    """Steps summed over trials, in trial order, until a COMPLETE trial first reaches target."""
    spent = 0
    for steps, value, state in zip(result["steps"], result["values"], result["states"]):
        spent += steps
        if state == "COMPLETE" and value is not None and value <= target + 1e-12:
            return spent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trials", type=int, default=len(LRS) * len(WARMUPS), help="trials per study (grid: first N points)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per full trial")
    parser.add_argument("--eval-steps", type=int, default=50, help="evaluate (and report to the pruner) every N steps")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per study")
    parser.add_argument("--out", type=Path, default=REPO_DIR / "outputs" / "benchmarks" / "sweep_pruning")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args.stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory() as tmp:
        grid = run("grid", GRID, args, Path(tmp))
        tpe = run("tpe_median", TPE, args, Path(tmp))
    grid_steps, tpe_steps = sum(grid["steps"]), sum(tpe["steps"])
    reach = steps_to_reach(tpe, grid["best"])
    print(f"\n{'study':<12}{'trials':>7}{'pruned':>7}{'train steps':>12}{'best eval WER':>14}{'minutes':>9}")
    for r in (grid, tpe):
        print(
            f"{r['study']:<12}{r['trials']:>7}{r['pruned']:>7}{sum(r['steps']):>12}{r['best']:>14.4f}{r['minutes']:>9}"
        )
    print(
        f"\nTPE + median pruning used {tpe_steps / grid_steps:.0%} of the grid's compute; best WER "
        f"{tpe['best']:.4f} vs the grid's {grid['best']:.4f}."
    )
    if reach is None:
        print("It did not reach the grid's best WER within its trials.")
    else:
        print(
            f"It first matched the grid's best WER after {reach} steps: {reach / grid_steps:.0%} of "
            "the grid's compute (goal <= 40%)."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results-{args.stamp}.json").write_text(
        json.dumps({"grid": grid, "tpe_median": tpe, "steps_to_reach_grid_best": reach}, indent=2)
    )


if __name__ == "__main__":
    main()
