"""One MLflow parent run per Hydra multirun (`train.py -m ...`), each job a child run of it.

A Hydra callback, registered in conf/train.yaml, so it works with any sweeper and launcher:
the driver process opens the parent and writes its id into the sweep folder; each job's
process (the same one, a local subprocess or a SLURM node sharing the folder) reads it there
and files its run as a child. At the end the parent gets the summary table and the WER plot.

Hydra calls `on_multirun_end` only when every job succeeded (its sweepers re-raise the first
failed job after the batch), so the parent is also closed from an exit handler: FAILED, or
KILLED after Ctrl-C/SIGTERM, never left RUNNING.
"""

from __future__ import annotations

import atexit
import logging
import signal
import tempfile
from datetime import datetime
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from asr.cli import fail
from asr.hydra_seam import launcher_kind, override_key, sweep_keys, sweep_overrides, sweeper_kind
from asr.records import SweepJob, SweepRecord

# MLflow, pandas and the tracking module load only in a sweep's driver: every train.py process instantiates
# this callback, and a single run or a job (or `--help`, `plan=true`) need none of them here.

log = logging.getLogger(__name__)


def _first_job_composes(config: DictConfig, overrides: list[str]) -> bool:
    """False for a typo in a grid key: then no parent is opened and Hydra's sweeper reports it."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not all(o.is_discrete_sweep() or not o.is_sweep_override() for o in parsed):
        return True  # intervals etc. belong to other sweepers, which validate their own
    first = [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
        for o in parsed
    ]
    try:
        GlobalHydra.instance().config_loader().load_sweep_config(config, first)
    except Exception:  # noqa: BLE001  (Hydra raises several kinds; it re-raises the same one itself)
        return False
    return True


class MlflowMultirunCallback(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None  # set in the driver process only
        self.tracking_uri: str | None = None
        self.sweep_dir: Path | None = None

    # ---- driver process ----------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        SweepRecord.remove(self.sweep_dir)  # never link jobs to an older sweep's parent
        if not config.tracking.enabled or sweeper_kind(config.hydra) == "optuna":
            return  # hydra/sweeper=optuna opens its own parent run per study (asr.sweep.parent_run)
        overrides = sweep_overrides(config)
        if not _first_job_composes(config, overrides):
            return
        from asr.tracking import TrackingUnavailableError, connect, create_parent_run

        try:
            client, experiment_id = connect(config.tracking)
        except TrackingUnavailableError as err:
            # Hydra turns a callback's exceptions into warnings and would start every job anyway.
            fail(f"not starting the sweep: {err}")
        keys = sweep_keys(overrides)
        swept = [o for o in overrides if override_key(o) in keys]
        name = f"{' '.join(swept) or 'multirun'} @ {datetime.now():%Y-%m-%d %H:%M}"
        tags = {
            "sweep_dir": str(self.sweep_dir.resolve()),
            "overrides": " ".join(overrides),
            "launcher": launcher_kind(config.hydra.launcher),
        }
        self.parent_run_id = create_parent_run(
            client, experiment_id, name, tags, {"sweep": " ".join(overrides), "swept_keys": ",".join(keys)}
        )
        self.tracking_uri = client.tracking_uri
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        SweepRecord(self.parent_run_id, self.tracking_uri, keys).write(self.sweep_dir)
        atexit.register(self._close_if_open)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # SLURM's scancel: exit through atexit
            signal.signal(signal.SIGTERM, lambda signum, frame: exit(128 + signum))
        log.info("Sweep %s: MLflow parent run %r (%s)", self.parent_run_id, name, self.tracking_uri)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._close(ended_normally=True)

    def _close_if_open(self) -> None:
        self._close(ended_normally=False)

    def _close(self, ended_normally: bool) -> None:
        if not self.parent_run_id:
            return
        run_id, self.parent_run_id = self.parent_run_id, None
        from mlflow.tracking import MlflowClient

        from asr.sweep_summary import summary_table
        from asr.sweep_summary import swept_keys as table_swept_keys
        from asr.tracking import close_parent_run

        client = MlflowClient(self.tracking_uri)
        table = summary_table(client, client.get_run(run_id))
        status = (
            "FINISHED"
            if ended_normally and (table["status"] == "FINISHED").all()
            else ("KILLED" if (table["status"] == "KILLED").any() else "FAILED")
        )
        files, metrics, tags = self._summary(client, table)
        close_parent_run(client, run_id, status, metrics, tags, files)
        failed = table[table["status"] != "FINISHED"]
        if len(failed):
            keys = table_swept_keys(table)
            lines = [
                f"  job {row['job']} ({' '.join(f'{k}={row[k]}' for k in keys)}, run "
                f"{row['run_id']}): {row['status']} {row['error']}"
                for _, row in failed.iterrows()
            ]
            log.error("Sweep %s: %d of %d jobs did not finish:\n%s", run_id, len(failed), len(table), "\n".join(lines))
        log.info("Sweep %s closed %s; compare with `python -m asr.sweep_summary %s`", run_id, status, run_id)

    def _summary(self, client, table) -> tuple[list[tuple[Path, None]], dict[str, float], dict[str, str]]:
        """summary.csv and the WER plot in the sweep folder, and the best job's metrics and tags."""
        from asr.sweep_summary import plot_name, plot_sweep

        folder = (
            self.sweep_dir
            if self.sweep_dir and self.sweep_dir.is_dir()
            else Path(tempfile.mkdtemp(prefix="asr-sweep-"))
        )
        files = [folder / "summary.csv"]
        table.to_csv(files[0], index=False)
        if len(table):
            files.append(folder / plot_name(table))
            plot_sweep(client, table, files[-1])
        finished = table[table["status"] == "FINISHED"].dropna(subset=["best_eval_wer"])
        if "role" in finished:  # a shared trunk is not a result: its branches are
            finished = finished[finished["role"] != "trunk"]
        metrics, tags = {"jobs_finished": len(finished)}, {}
        if len(finished):
            best = finished.iloc[0]
            metrics["best_eval_wer"] = float(best["best_eval_wer"])
            tags = {"best_run_id": best["run_id"], "best_job": str(best["job"])}
        return [(path, None) for path in files], metrics, tags


def sweep_job(hydra_cfg: DictConfig) -> SweepJob | None:
    """In a job of a `-m` grid (any process, any node): its place in the grid, read from the sweep folder."""
    record = SweepRecord.read(Path(hydra_cfg.sweep.dir)) if hydra_cfg.mode == RunMode.MULTIRUN else None
    if record is None:
        return None
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    swept = {o.key_or_group: o.get_value_element_as_str() for o in parsed if o.key_or_group in record.swept_keys}
    return SweepJob(record.parent_run_id, int(hydra_cfg.job.num), swept)
