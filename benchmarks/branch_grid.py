"""An epoch grid two ways: independent runs (each with its own schedule) against one WSD trunk
with cooldown branches (`hydra/sweeper=branches`): compute and test WER/CER per length.

    .venv/bin/python benchmarks/branch_grid.py                                  # 2,4,8 epochs, 2 seeds, 2 lrs
    .venv/bin/python benchmarks/branch_grid.py --epochs 1,2,4 --seeds 42 --lrs 3e-3

For each learning rate and seed, both grids run as a user types them (alternating which goes
first), on the built-in corpus with the default settings otherwise:

    python train.py -m trainer.epochs=2,4,8 trainer.lr=LR seed=S      # independent: the cpu preset's cosine
    python train.py -m trainer.epochs=2,4,8 trainer.lr=LR seed=S trainer.lr_scheduler=wsd hydra/sweeper=branches

Printed: optimizer steps of each grid and their ratio; per length, both test WER/CER and the paired
bootstrap difference over the test utterances (B = the branch, A = the independent run; the same
numbers as `python -m asr.evaluate compare=[A,B]`); the learning rate the independent grid finds
best (lowest mean dev WER over lengths and seeds) and the verdicts there. Everything is appended
to --out (JSON lines) as it is measured. Extra Hydra overrides go to both grids.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asr.report import paired_comparison  # noqa: E402

BOOTSTRAP = OmegaConf.create({"unit": "auto", "resamples": 1000, "seed": 0})


def run_grid(kind: str, epochs: str, lr: str, seed: int, work: Path, extra: list[str]) -> dict:
    sweep_dir = work / f"{kind}-lr{lr}-seed{seed}"
    command = [
        sys.executable,
        "train.py",
        "-m",
        f"trainer.epochs={epochs}",
        f"trainer.lr={lr}",
        f"seed={seed}",
        f"hydra.sweep.dir={sweep_dir}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=branch-grid-benchmark",
        *extra,
    ]
    if kind == "branches":
        command += ["trainer.lr_scheduler=wsd", "hydra/sweeper=branches", f"hydra.sweeper.trunks_dir={work / 'trunks'}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    runs = {}
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        if "test_wer" not in metrics:
            continue  # a trunk job
        length = float(OmegaConf.load(metrics_file.parent / ".hydra" / "config.yaml").trainer.epochs)
        runs[length] = {"dir": str(metrics_file.parent), **metrics}
    steps = (
        json.loads((sweep_dir / "branches.json").read_text())["compute_steps"]
        if kind == "branches"
        else sum(r["train_steps"] for r in runs.values())
    )
    return {"kind": kind, "lr": lr, "seed": seed, "wall_s": wall, "steps": steps, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", default="2,4,8", help="the grid's lengths")
    parser.add_argument("--seeds", default="42,43")
    parser.add_argument("--lrs", default="3e-3,1.5e-3", help="learning rates (the first is the cpu preset's)")
    parser.add_argument("--work", default="outputs/branch-grid-benchmark", help="sweep folders, trunks, mlflow.db")
    parser.add_argument("--out", default="branch_grid_results.jsonl")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both grids")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    def record(row: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    grids = []
    order = 0
    for lr in args.lrs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            kinds = ("independent", "branches") if order % 2 == 0 else ("branches", "independent")
            order += 1
            pair = {}
            for kind in kinds:
                pair[kind] = run_grid(kind, args.epochs, lr, seed, work, args.overrides)
                print(
                    f"lr {lr} seed {seed} {kind}: {pair[kind]['steps']:.0f} optimizer steps, "
                    f"{pair[kind]['wall_s']:.0f} s",
                    flush=True,
                )
            row = {"lr": lr, "seed": seed, "ratio_steps": pair["branches"]["steps"] / pair["independent"]["steps"]}
            row["independent_steps"], row["branch_steps"] = pair["independent"]["steps"], pair["branches"]["steps"]
            row["lengths"] = {}
            for length, a in sorted(pair["independent"]["runs"].items()):
                b = pair["branches"]["runs"][length]
                paired = paired_comparison(Path(a["dir"]), Path(b["dir"]), "test", BOOTSTRAP)
                row["lengths"][f"{length:g}"] = {
                    "independent": {k: a[k] for k in ("eval_wer", "test_wer", "test_cer")},
                    "branch": {k: b[k] for k in ("eval_wer", "test_wer", "test_cer")},
                    "wer": paired["wer"],
                    "cer": paired["cer"],
                    "dirs": [a["dir"], b["dir"]],
                }
                print(
                    f"  {length:g} epochs: test WER {a['test_wer']:.4f} → {b['test_wer']:.4f}, "
                    f"CER {a['test_cer']:.4f} → {b['test_cer']:.4f} | {paired['wer']['verdict']} | "
                    f"{paired['cer']['verdict']}",
                    flush=True,
                )
            print(
                f"  compute: {row['branch_steps']:.0f} / {row['independent_steps']:.0f} steps "
                f"= {row['ratio_steps']:.2f}"
            )
            record(row)
            grids.append(row)

    by_lr: dict[str, list[float]] = {}
    for row in grids:
        by_lr.setdefault(row["lr"], []).extend(v["independent"]["eval_wer"] for v in row["lengths"].values())
    best_lr = min(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))
    print(f"\nindependent grid's best learning rate (mean dev WER over lengths and seeds): {best_lr}")
    summary = {"best_lr": best_lr, "mean_ratio_steps": sum(r["ratio_steps"] for r in grids) / len(grids)}
    for row in grids:
        verdicts = [f"{k}: {v['wer']['verdict']}" for k, v in row["lengths"].items()]
        print(f"lr {row['lr']} seed {row['seed']} (ratio {row['ratio_steps']:.2f}): " + " | ".join(verdicts))
    record({"summary": summary})


if __name__ == "__main__":
    main()
