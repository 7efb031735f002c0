"""Today's study against a study whose trials share trunks (sweep.fidelity=branches), at equal trial budget.

Both search learning rate x length (trainer.epochs a choice) with the tiny model on the built-in corpus:
- `independent`: TPE + median pruning, every trial its own run (pruned mid-schedule on eval WER);
- `branches`: TPE + successive halving, every trial one WSD trunk whose rungs are cooldown branches at
  each length (pruned on finished models only).
The reference is the full grid (every learning rate of --grid-lrs at every length, as independent runs;
trained here as shared-trunk branches, which are the same runs: docs/branches.md). Printed, from this one
run and per sampler seed: each study's optimizer steps and minutes, the steps until a finished model first
reached the grid's best dev WER (as a share of the grid's compute), and the two winners' test WER with a
paired bootstrap. With --averaging, also runs at the longest length tested with and without the average
of 3 of their checkpoints (the newest, the best on dev, or those saved through the WSD decay).

    .venv/bin/python benchmarks/branch_sweep.py --averaging  # 8-lr grid, 8 + 8 trials x seeds 0 1 2 (~40 min)
    .venv/bin/python benchmarks/branch_sweep.py --seeds 0 --trials 6               # a quicker look
    .venv/bin/python benchmarks/branch_sweep.py --no-studies --averaging cooldown  # one averaging run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir

import asr  # noqa: F401  (registers ${repo_dir:})
from asr.averaging import CHOICES
from asr.paths import REPO_DIR
from asr.report import default_bootstrap, paired_comparison
from asr.sweep import run_study
from asr.sweep.report import trial_steps
from asr.sweep.spec import spec_from_config

LENGTHS = (2, 4, 7)
LR_LOW, LR_HIGH = 3e-4, 1e-2


ARMS = ("independent", "branches", "independent_loss")


def study_body(kind: str, seed: int) -> str:
    """The study of one arm: `independent` is today's default study, `branches` the lr_branches preset's
    settings (successive halving on each rung's dev loss), `independent_loss` today's pruned on dev loss."""
    pruner = (
        "  name: successive_halving\n  warmup_evals: 0\n  reduction_factor: 3\n  metric: eval_loss\n"
        if kind == "branches"
        else "  name: median\n  warmup_evals: 2\n  n_startup_trials: 2\n"
        + ("  metric: eval_loss\n" if kind == "independent_loss" else "")
    )
    return (
        f"sampler:\n  name: tpe\n  seed: {seed}\n  n_startup_trials: 3\npruner:\n{pruner}"
        f"fidelity: {'branches' if kind == 'branches' else 'none'}\n"
        f"params:\n  trainer:\n    lr: tag(log, interval({LR_LOW}, {LR_HIGH}))\n"
        f"    epochs: choice({', '.join(map(str, LENGTHS))})\n"
    )


def run(kind: str, seed: int, args, root: Path) -> dict:
    conf = root / "conf"
    (conf / "sweep").mkdir(parents=True, exist_ok=True)
    name = f"{kind}-s{seed}"
    (conf / "sweep" / f"{name}.yaml").write_text(
        "defaults:\n  - /shared/sweep@_here_\n  - _self_\n" + study_body(kind, seed)
    )
    overrides = [
        f"hydra.searchpath=[file://{conf}]",
        f"sweep={name}",
        f"sweep.study_name={name}-{args.stamp}",
        f"sweep.dir={args.out / f'{name}-{args.stamp}'}",
        "sweep.export_dir=null",
        f"sweep.workers={args.workers}",
        f"sweep.n_trials={args.trials}",
        f"trainer.eval_steps={args.eval_steps}",
        f"dataset.sizes.train={args.train_utterances}",
        "tracking.experiment=benchmark-branch-sweep",
    ]
    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base="1.3"):
        cfg = compose("study", overrides=overrides)
    spec = spec_from_config(cfg, overrides)
    started = time.perf_counter()
    study = run_study(spec)
    minutes = (time.perf_counter() - started) / 60
    events = []  # (trial, steps it trained, best dev WER of a finished model it made, that model's folder)
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        folder = spec.dir / f"trial_{trial.number:04d}"
        if kind == "branches":
            rungs = [trial.user_attrs[k] for k in sorted(trial.user_attrs) if k.startswith("rung_")]
            wers = [(r["eval_wer"], folder / f"rung_{i}_branch") for i, r in enumerate(rungs) if "eval_wer" in r]
        else:
            finished = trial.state.name == "COMPLETE" and trial.value is not None
            wers = [(trial.value, folder)] if finished else []
        best = min(wers, default=(math.inf, None), key=lambda w: w[0])
        events.append((trial.number, trial_steps(trial), best[0], best[1] and str(best[1])))
    winner = min(events, key=lambda e: e[2])
    return {"study": name, "minutes": round(minutes, 1), "events": events, "winner": winner}


def steps_to_reach(events, target: float) -> int | None:
    spent = 0
    for _, steps, wer, _ in events:
        spent += steps
        if wer <= target + 1e-12:
            return spent
    return None


def grid_reference(args, root: Path) -> tuple[float, int]:
    """The full grid's best dev WER and its compute as independent runs (optimizer steps)."""
    import subprocess
    import sys

    lrs = [LR_LOW * (LR_HIGH / LR_LOW) ** (i / (args.grid_lrs - 1)) for i in range(args.grid_lrs)]
    sweep_dir = args.out / f"grid-{args.stamp}"
    command = [
        sys.executable,
        str(REPO_DIR / "train.py"),
        "-m",
        "hydra/sweeper=branches",
        f"trainer.epochs={','.join(map(str, LENGTHS))}",
        f"trainer.lr={','.join(f'{lr:.6g}' for lr in lrs)}",
        f"trainer.eval_steps={args.eval_steps}",
        f"dataset.sizes.train={args.train_utterances}",
        "tracking.experiment=benchmark-branch-sweep",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    subprocess.run(command, check=True, cwd=root)
    summary = json.loads((sweep_dir / "branches.json").read_text())
    runs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    best = min(m["eval_wer"] for m in runs if "fork_step" in m)  # the branches: the grid's finished models
    return best, int(summary["independent_steps"])


def averaging(args, root: Path, by: str) -> dict:
    """A run at the longest length tested with and without the average of 3 of its checkpoints, chosen `by`."""
    import subprocess
    import sys

    folder = args.out / f"averaging-{by}-{args.stamp}"
    command = [
        sys.executable,
        str(REPO_DIR / "train.py"),
        f"trainer.epochs={LENGTHS[-1]}",
        "trainer.average_checkpoints=3",
        f"trainer.average_checkpoints_by={by}",
        "trainer.save_total_limit=null",
        f"trainer.eval_steps={args.eval_steps}",
        f"dataset.sizes.train={args.train_utterances}",
        "tracking.experiment=benchmark-branch-sweep",
        f"hydra.run.dir={folder}",
    ]
    subprocess.run(command, check=True, cwd=root)
    metrics = json.loads((folder / "metrics.json").read_text())
    compared = paired_comparison(folder, folder / "average", "test", default_bootstrap())
    return {
        "test_wer": metrics["test_wer"],
        "test_avg_wer": metrics["test_avg_wer"],
        "eval_wer": metrics["eval_wer"],
        "eval_avg_wer": metrics["eval_avg_wer"],
        "extra_time": metrics["average_seconds"] / metrics["train_runtime"],
        "verdict": compared["wer"]["verdict"],
    }


def studies(args, root: Path, results: dict) -> None:
    """The full grid, then per seed today's study and the trunk-sharing one, printed as they finish."""
    target, grid_steps = grid_reference(args, root)
    results["grid"] = {"best_eval_wer": target, "independent_steps": grid_steps}
    print(f"\nfull grid: best dev WER {target:.4f}, {grid_steps} optimizer steps as independent runs")
    for seed in args.seeds:
        pair = {kind: run(kind, seed, args, root) for kind in args.arms}
        near = f"to +{args.tolerance:g}"
        print(
            f"\nseed {seed}: {'study':<18}{'steps':>8}{'minutes':>9}{'to grid best':>14}{near:>14}{'best dev WER':>14}"
        )
        for kind, result in pair.items():
            shares = []
            for key, goal in (("steps_to_grid_best", target), ("steps_to_near_grid_best", target + args.tolerance)):
                result[key] = reach = steps_to_reach(result["events"], goal)
                shares.append(f"{reach / grid_steps:.0%}" if reach is not None else "not reached")
            steps = sum(e[1] for e in result["events"])
            print(
                f"{'':8}{kind:<18}{steps:>8}{result['minutes']:>9}{shares[0]:>14}{shares[1]:>14}"
                f"{result['winner'][2]:>14.4f}"
            )
        results["seeds"][seed] = pair
        if not {"independent", "branches"} <= pair.keys():
            continue
        a, b = pair["independent"]["winner"][3], pair["branches"]["winner"][3]
        if a is not None and b is not None:
            compared = paired_comparison(Path(a), Path(b), "test", default_bootstrap())
            pair["test_comparison"] = compared
            print(f"{'':8}winners on test (A = independent, B = branches): {compared['wer']['verdict']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8, help="trials per study")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds (one pair of studies each)"
    )
    parser.add_argument("--grid-lrs", type=int, default=8, help="learning rates of the reference grid (log-spaced)")
    parser.add_argument("--eval-steps", type=int, default=50, help="evaluate (and report to the pruner) every N steps")
    parser.add_argument("--train-utterances", type=int, default=400, help="train split size of the built-in corpus")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="also count steps until a model came within this of the grid's best",
    )
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS[:2], help="the studies compared per seed")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per study")
    parser.add_argument(
        "--averaging",
        nargs="*",
        choices=CHOICES,
        help="also measure checkpoint averaging, one run per choice of checkpoints (none given: all three)",
    )
    parser.add_argument("--no-studies", action="store_true", help="skip the grid and the studies")
    parser.add_argument("--out", type=Path, default=REPO_DIR / "outputs" / "benchmarks" / "branch_sweep")
    args = parser.parse_args()
    if args.averaging == []:
        args.averaging = list(CHOICES)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args.stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_studies:
            studies(args, Path(tmp), results)
        for by in args.averaging or ():
            results.setdefault("averaging", {})[by] = averaged = averaging(args, Path(tmp), by)
            print(
                f"\naveraging 3 checkpoints (by={by}): test WER {averaged['test_wer']:.4f} -> "
                f"{averaged['test_avg_wer']:.4f}, dev {averaged['eval_wer']:.4f} -> {averaged['eval_avg_wer']:.4f} "
                f"(A = the run's model, B = the average: {averaged['verdict']}), "
                f"{averaged['extra_time']:.1%} of the training time"
            )
    (args.out / f"results-{args.stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {args.out / f'results-{args.stamp}.json'}")


if __name__ == "__main__":
    main()
