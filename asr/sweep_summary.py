"""The summary of a grid or study: its jobs as a table sorted by WER (summary.csv), the WER plot,
and the command that prints them from the tracking store.

    python -m asr.sweep_summary               # the latest grid or study (make compare)
    python -m asr.sweep_summary <sweep_id>    # a given one (the parent run's id)
    make compare

(Not to be confused with `python -m asr.evaluate compare=[A,B]`, the paired bootstrap of two runs.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from asr import cli
from asr.errors import UserError
from asr.tracking import tracking_uri

COLUMNS = ["best_eval_wer", "test_wer", "test_cer", "runtime_min", "status"]
LM_COLUMNS = ["test_lm_wer", "test_lm_cer"]  # jobs run with lm.after_training=true: test decoded with the n-gram LM too


def find_sweep(client: MlflowClient, sweep_id: str) -> Run:
    """The parent run of a sweep; `latest` = the most recently started one in any experiment."""
    if sweep_id != "latest":
        try:
            return client.get_run(sweep_id)
        except MlflowException as err:
            raise UserError(
                f"no run {sweep_id} in {client.tracking_uri}. Fix: pass a sweep's parent run id "
                "(the sweep_id tag), or latest"
            ) from err
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(
        experiments, "tags.sweep_role = 'parent'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not parents:
        raise UserError(
            f"no sweep found in {client.tracking_uri}. Fix: run one (python train.py -m ... or python sweep.py), "
            "or point --uri / MLFLOW_TRACKING_URI at the store that has it"
        )
    return parents[0]


def sweep_jobs(client: MlflowClient, parent: Run) -> list[Run]:
    """Every job run of a sweep, through MLflow's search (all pages)."""
    query = f"tags.sweep_id = '{parent.info.run_id}' AND tags.sweep_role = 'job'"
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], query, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def summary_table(client: MlflowClient, parent: Run) -> pd.DataFrame:
    """One row per job: swept values, best eval WER, test WER/CER, runtime, status (+ error), run id."""
    rows = []
    for run in sweep_jobs(client, parent):
        swept = {k.removeprefix("swept."): v for k, v in run.data.params.items() if k.startswith("swept.")}
        ended = run.info.end_time or int(time.time() * 1000)
        rows.append(
            {
                "job": int(run.data.tags["job_num"]),
                **dict(sorted(swept.items())),
                **({"role": run.data.tags["branch_role"]} if "branch_role" in run.data.tags else {}),
                **({"rung": int(run.data.tags["rung"])} if "rung" in run.data.tags else {}),
                **{m: run.data.metrics.get(m, float("nan")) for m in ("best_eval_wer", "test_wer", "test_cer")},
                **{m: run.data.metrics[m] for m in LM_COLUMNS if m in run.data.metrics},
                "runtime_min": round((ended - run.info.start_time) / 60000, 1),
                "status": run.info.status,
                "error": run.data.tags.get("error", ""),
                "run_id": run.info.run_id,
            }
        )
    table = pd.DataFrame(rows, columns=None if rows else ["job", *COLUMNS, "error", "run_id"])
    return table.sort_values(["best_eval_wer", "job"], na_position="last").reset_index(drop=True)


def swept_keys(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ("job", "role", "rung", *COLUMNS, *LM_COLUMNS, "error", "run_id")]


def plot_sweep(client: MlflowClient, table: pd.DataFrame, path: Path) -> Path:
    """Eval WER curves of every job over training steps, and each job's final test WER."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = swept_keys(table)
    label = lambda row: ", ".join(f"{k}={row[k]}" for k in keys) or f"job {row['job']}"  # noqa: E731
    figure, (curves, finals) = plt.subplots(1, 2, figsize=(13, 4.8))
    for _, row in table.sort_values("job").iterrows():
        history = sorted(client.get_metric_history(row["run_id"], "eval_wer"), key=lambda m: m.step)
        curves.plot([m.step for m in history], [m.value for m in history], marker="o", markersize=3, label=label(row))
    curves.set(xlabel="optimizer step", ylabel="eval WER", title="Eval WER during training")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    ordered = table.sort_values("job")
    finals.bar(
        [label(row) for _, row in ordered.iterrows()],
        ordered["test_wer"].fillna(0.0),
        color=["tab:red" if s != "FINISHED" else "tab:blue" for s in ordered["status"]],
    )
    finals.set(ylabel="test WER", title="Final test WER per job (red: not finished)")
    finals.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_name(table: pd.DataFrame) -> str:
    return f"wer_vs_{'_'.join(swept_keys(table)) or 'job'}.png"


def compare_top_two(client: MlflowClient, table: pd.DataFrame) -> str | None:
    """Is the best job really better than the runner-up? A paired bootstrap on their test predictions."""
    finished = table[table["status"] == "FINISHED"].dropna(subset=["best_eval_wer"])
    if len(finished) < 2:
        return None
    best, second = finished.iloc[0], finished.iloc[1]
    folders = [Path(client.get_run(row["run_id"]).data.tags.get("output_dir", "")) for row in (best, second)]
    if not all((folder / "predictions_test.jsonl").is_file() for folder in folders):
        return None  # run folders on another machine
    from asr.report import default_bootstrap, paired_comparison

    result = paired_comparison(folders[0], folders[1], "test", default_bootstrap())
    return f"A = best job {best['job']}, B = runner-up job {second['job']}, test split: {result['wer']['verdict']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a sweep's jobs sorted by best eval WER.")
    parser.add_argument("sweep", nargs="?", default="latest", help="sweep id (the parent run id) or 'latest'")
    parser.add_argument(
        "--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or the repo's mlflow.db)"
    )
    args = parser.parse_args(argv)
    client = MlflowClient(tracking_uri(args.uri))
    parent = find_sweep(client, args.sweep)
    table = summary_table(client, parent)
    print(f"Sweep {parent.info.run_id}: {parent.info.run_name} [{parent.info.status}]")
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        print(table.drop(columns=["error"] if not table["error"].astype(bool).any() else []).to_string(index=False))
    verdict = compare_top_two(client, table)
    if verdict:
        print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
