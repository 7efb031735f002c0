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
import json
import logging
import signal
import tempfile
from datetime import datetime
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from asr.cli import fail
from asr.compare import plot_name, plot_sweep, summary_table
from asr.compare import swept_keys as table_swept_keys
from asr.tracking import SweepJob, TrackingUnavailableError, connect, git_state, set_sweep_job

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"  # in the sweep folder: how jobs find their parent run


def sweep_overrides(config: DictConfig) -> list[str]:
    """Command-line overrides plus an experiment preset's `hydra.sweeper.params` (the command line wins)."""
    overrides = list(config.hydra.overrides.task)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    params = config.hydra.sweeper.get("params") or {}
    return overrides + [f"{key}={value}" for key, value in params.items() if key not in given]


def sweep_keys(overrides: list[str]) -> list[str]:
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def _first_job_composes(config: DictConfig, overrides: list[str]) -> bool:
    """False for a typo in a grid key: then no parent is opened and Hydra's sweeper reports it."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not all(o.is_discrete_sweep() or not o.is_sweep_override() for o in parsed):
        return True  # intervals etc. belong to other sweepers, which validate their own
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line for o in parsed]
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
        (self.sweep_dir / SWEEP_FILE).unlink(missing_ok=True)  # never link jobs to an older sweep's parent
        if not config.tracking.enabled or "asr_optuna_sweeper" in str(config.hydra.sweeper.get("_target_", "")):
            return  # hydra/sweeper=optuna opens its own parent run per study (asr.sweep.parent_run)
        overrides = sweep_overrides(config)
        if not _first_job_composes(config, overrides):
            return
        try:
            client, experiment_id = connect(config.tracking)
        except TrackingUnavailableError as err:
            # Hydra turns a callback's exceptions into warnings and would start every job anyway.
            fail(f"not starting the sweep: {err}")
        keys = sweep_keys(overrides)
        swept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys]
        name = f"{' '.join(swept) or 'multirun'} @ {datetime.now():%Y-%m-%d %H:%M}"
        tags = {**git_state(), "sweep_role": "parent", "sweep_dir": str(self.sweep_dir.resolve()),
                "overrides": " ".join(overrides), "launcher": config.hydra.launcher._target_.rsplit(".", 1)[-1]}
        self.parent_run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        self.tracking_uri = client.tracking_uri
        client.set_tag(self.parent_run_id, "sweep_id", self.parent_run_id)
        client.log_param(self.parent_run_id, "sweep", " ".join(overrides)[:500])
        client.log_param(self.parent_run_id, "swept_keys", ",".join(keys))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {"parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri, "swept_keys": keys}
        (self.sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=2))
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
        client = MlflowClient(self.tracking_uri)
        table = summary_table(client, client.get_run(run_id))
        status = "FINISHED" if ended_normally and (table["status"] == "FINISHED").all() else (
            "KILLED" if (table["status"] == "KILLED").any() else "FAILED")
        self._log_summary(client, run_id, table)
        client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
        failed = table[table["status"] != "FINISHED"]
        if len(failed):
            keys = table_swept_keys(table)
            lines = [f"  job {row['job']} ({' '.join(f'{k}={row[k]}' for k in keys)}, run {row['run_id']}): {row['status']} {row['error']}"
                     for _, row in failed.iterrows()]
            log.error("Sweep %s: %d of %d jobs did not finish:\n%s", run_id, len(failed), len(table), "\n".join(lines))
        log.info("Sweep %s closed %s; compare with `python -m asr.compare %s`", run_id, status, run_id)

    def _log_summary(self, client: MlflowClient, run_id: str, table) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for path in (Path(tmp) / "summary.csv", Path(tmp) / plot_name(table)):
                if path.suffix == ".csv":
                    table.to_csv(path, index=False)
                elif len(table):
                    plot_sweep(client, table, path)
                else:
                    continue
                client.log_artifact(run_id, str(path))
                if self.sweep_dir and self.sweep_dir.is_dir():
                    (self.sweep_dir / path.name).write_bytes(path.read_bytes())
        finished = table[table["status"] == "FINISHED"].dropna(subset=["best_eval_wer"])
        client.log_metric(run_id, "jobs_finished", len(finished))
        if len(finished):
            best = finished.iloc[0]
            client.log_metric(run_id, "best_eval_wer", float(best["best_eval_wer"]))
            client.set_tag(run_id, "best_run_id", best["run_id"])
            client.set_tag(run_id, "best_job", str(best["job"]))

    # ---- job processes -----------------------------------------------------------------------
    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        set_sweep_job(None)
        record_file = Path(config.hydra.sweep.dir) / SWEEP_FILE
        if config.hydra.mode != RunMode.MULTIRUN or not record_file.is_file():
            return
        record = json.loads(record_file.read_text())
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = {o.key_or_group: o.get_value_element_as_str() for o in parsed if o.key_or_group in record["swept_keys"]}
        set_sweep_job(SweepJob(record["parent_run_id"], int(config.hydra.job.num), swept))

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        set_sweep_job(None)
