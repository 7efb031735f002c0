"""Training pace beside a busy neighbour, over the idle pace, for each CPU thread policy.

    .venv/bin/python benchmarks/thread_policy.py                       # every arm, 2 rounds
    .venv/bin/python benchmarks/thread_policy.py --rounds 3 --steps 120 --out thread_policy.jsonl

Every measurement is the same command a user types, `python train.py debug=fast
trainer.max_steps=<steps>`, in a fresh process, with one thread policy (environment and
`trainer.cpu_threads`); its
`train_runtime` (metrics.json) is the time. Each arm runs idle, then beside one ordinary busy
process (a single-threaded Python loop, like a compile or a browser tab), and the arms alternate
round by round, so a slow stretch of the machine hits every arm alike.

Printed per arm: median idle seconds, median busy seconds, busy pace over idle pace (fair sharing
of 2 cores with one neighbour gives ~0.5; spin-waiting threads fall far below), and idle pace
relative to libgomp's default (`today`). Every result line goes to --out as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name → (environment, overrides). "today" is what ran before: all cores, libgomp's default waiting (spin,
# then sleep); "adaptive" is the default now (trainer.cpu_threads=adaptive: the cores others leave free).
ARMS = {
    "today": ({}, ["trainer.cpu_threads=all"]),
    "adaptive": ({}, []),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["trainer.cpu_threads=all"]),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, ["trainer.cpu_threads=all"]),
    "one_thread": ({"OMP_NUM_THREADS": "1"}, []),
}


def train_seconds(arm: tuple[dict[str, str], list[str]], steps: int, work: Path) -> float:
    """train_runtime of one `train.py debug=fast` run with this arm's environment and overrides."""
    env_extra, overrides = arm
    run_dir = Path(tempfile.mkdtemp(dir=work))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(env_extra)
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "debug=fast",
        f"trainer.max_steps={steps}",
        "tracking.enabled=false",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    subprocess.run(cmd, env=env, cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run_dir / "metrics.json").read_text())["train_runtime"]


def busy_neighbour() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs every arm idle and busy")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument(
        "--out", type=Path, default=Path("thread_policy.jsonl"), help="JSON lines, appended as measured"
    )
    args = parser.parse_args()
    print(f"cores {os.cpu_count()}, load average before start {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="thread-policy-") as tmp:
        work = Path(tmp)
        train_seconds(ARMS[args.arms[0]], 10, work)  # warm-up: speaks the corpus and caches features once
        for round_index in range(args.rounds):
            arms = args.arms if round_index % 2 == 0 else list(reversed(args.arms))
            for arm in arms:
                for condition in ("idle", "busy"):
                    neighbour = busy_neighbour() if condition == "busy" else None
                    try:
                        time.sleep(0.5 if neighbour else 0)
                        seconds = train_seconds(ARMS[arm], args.steps, work)
                    finally:
                        if neighbour:
                            neighbour.kill()
                            neighbour.wait()
                    results.setdefault((arm, condition), []).append(seconds)
                    line = {
                        "round": round_index,
                        "arm": arm,
                        "env": ARMS[arm][0],
                        "overrides": ARMS[arm][1],
                        "condition": condition,
                        "steps": args.steps,
                        "train_runtime": round(seconds, 2),
                    }
                    with args.out.open("a") as out:
                        out.write(json.dumps(line) + "\n")
                    print(json.dumps(line), flush=True)
    today_idle = statistics.median(results[("today", "idle")]) if ("today", "idle") in results else None
    print(f"\n{'arm':<10}{'idle s':>9}{'busy s':>9}{'busy/idle pace':>16}{'idle pace vs today':>20}")
    for arm in args.arms:
        idle, busy = statistics.median(results[(arm, "idle")]), statistics.median(results[(arm, "busy")])
        versus = f"{today_idle / idle:.2f}" if today_idle else "-"
        print(f"{arm:<10}{idle:>9.1f}{busy:>9.1f}{idle / busy:>16.2f}{versus:>20}")


if __name__ == "__main__":
    main()
