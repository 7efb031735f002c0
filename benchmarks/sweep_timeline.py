"""Where a sweep's wall time goes, read from its logs: driver start-up, queueing, each worker's
start-up, each trial's start-up and training, and the driver's wrap-up.

    python benchmarks/sweep_timeline.py outputs/sweeps/<study>      # a sweep.py folder (SLURM or local workers)

Times are seconds after the driver's first log line. "first step" is the first training loss the
trial logged to MLflow (logging_steps), so it includes the first few steps.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime
from pathlib import Path

from mlflow.tracking import MlflowClient

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
SUBMITIT = re.compile(r"^submitit INFO \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - Starting")


def when(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def events(path: Path, patterns: dict[str, str]) -> dict[str, float]:
    """First time each pattern appears in a log (its line's timestamp)."""
    found: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        stamp = STAMP.match(line) or SUBMITIT.match(line)
        if not stamp:
            continue
        if SUBMITIT.match(line):
            found.setdefault("job started (SLURM)", when(stamp.group(1)))
        for name, pattern in patterns.items():
            if name not in found and re.search(pattern, line):
                found[name] = when(stamp.group(1))
    return found


def main(sweep_dir: str) -> None:
    folder = Path(sweep_dir)
    driver = events(
        folder / "sweep.log", {"start": r".", "submitted": r"submitted \d+ workers", "end": r"parent run .* closed"}
    )
    t0 = driver["start"]
    print(
        f"driver: submitted at {driver.get('submitted', float('nan')) - t0:6.1f} s, closed at "
        f"{driver['end'] - t0:6.1f} s"
    )
    logs = sorted((folder / "submitit").glob("*_*/*_0_log.err")) or sorted((folder / "workers").glob("worker_*.log"))
    for log in logs:
        ev = events(log, {"joined study": r"joins study", "done": r"done after"})
        print(
            f"{log.parent.name or log.stem}: "
            + ", ".join(f"{k} {v - t0:6.1f} s" for k, v in sorted(ev.items(), key=lambda kv: kv[1]))
        )
    client = MlflowClient()
    for trial_dir in sorted(folder.glob("trial_*")):
        record = trial_dir / "mlflow_run.json"
        if not record.is_file():
            continue
        run_id = re.search(r'"run_id": "(\w+)"', record.read_text()).group(1)
        run = client.get_run(run_id)
        losses = client.get_metric_history(run_id, "loss")
        first = min((m.timestamp for m in losses), default=None)
        start, end = run.info.start_time / 1000, (run.info.end_time or 0) / 1000
        print(
            f"{trial_dir.name}: run created {start - t0:6.1f} s, first loss logged {(first or 0) / 1000 - t0:6.1f} s, "
            f"ended {end - t0:6.1f} s ({run.info.status})"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/sweep_timeline.py <sweep folder>")
    main(sys.argv[1])
