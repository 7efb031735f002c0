"""MLflow: one run per training job, holding the composed Hydra config, curves and outputs.

We talk to MLflow through `MlflowClient` with an explicit run id rather than the fluent API's
process-global active run, and log metrics from our own small TrainerCallback instead of HF's
`report_to="mlflow"`: that callback logs ~170 TrainingArguments/model-config params which
drown the Hydra ones users actually sweep, and it ends runs it did not start.
"""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from asr.errors import UserError
from asr.paths import REPO_DIR
from asr.records import SweepJob

log = logging.getLogger(__name__)

PARAM_VALUE_LIMIT = 500  # MLflow accepts 6000 characters; long lists are unreadable in the UI anyway
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, judges); ours are model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(uri: str | None = None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else an SQLite store at the repository root."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_DIR / 'mlflow.db'}"


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Dotted keys → short string values: `trainer.lr: 0.003`, as the compare view shows them."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            text = str(node)
            flat[prefix[:-1]] = text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 1] + "…"

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the code that ran ('unknown' outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain"))).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": "unknown", "git_dirty": "unknown"}


class TrackingUnavailableError(UserError, RuntimeError):
    """The MLflow tracking server cannot be reached; raised before any training starts."""


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a server that is down: MLflow's own client would retry for minutes, then lose the run."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except OSError as err:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is not reachable ({err}). Fix: start it (docs/cluster.md, "
            "'Tracking server'), "
            "correct MLFLOW_TRACKING_URI / tracking.uri, or train without tracking: tracking.enabled=false"
        ) from err


def connect(tracking_cfg: DictConfig) -> tuple[MlflowClient, str]:
    """Client and experiment id for tracking_cfg (the experiment is created on first use)."""
    uri = tracking_uri(tracking_cfg.uri)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking_cfg.experiment)
    if experiment is not None:
        if not set(EXPERIMENT_KIND) <= set(experiment.tags):
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return client, experiment.experiment_id
    # Keep artifacts next to the default store, not in whatever cwd the job ran from.
    location = (REPO_DIR / "mlruns").as_uri() if uri.startswith("sqlite:///") and not tracking_cfg.uri else None
    try:
        return client, client.create_experiment(
            tracking_cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND
        )
    except MlflowException:  # a parallel job created it first
        return client, client.get_experiment_by_name(tracking_cfg.experiment).experiment_id


def create_parent_run(
    client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str], params: dict[str, object]
) -> str:
    """The parent run of a grid or a study: its jobs/trials become children (SweepJob), `sweep_id` = its id."""
    run_id = client.create_run(
        experiment_id, run_name=name, tags={**git_state(), "sweep_role": "parent", **tags}
    ).info.run_id
    client.set_tag(run_id, "sweep_id", run_id)
    client.log_batch(run_id, params=[Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()])
    return run_id


def log_parent_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """Grid-level figures on a parent run while it is open (e.g. a shared trunk's compute)."""
    now = get_current_time_millis()
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def close_parent_run(
    client: MlflowClient,
    run_id: str,
    status: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    files: list[tuple[Path, str | None]] = (),
) -> None:
    """Summary files (path, artifact folder), best-job metrics and tags, then FINISHED / FAILED / KILLED."""
    for path, folder in files:
        if path and path.exists():
            client.log_artifact(run_id, str(path), artifact_path=folder)
    now = get_current_time_millis()
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


class MlflowRun:
    """A run in the configured store; every method is a no-op when tracking is disabled.

    `sweep`: the grid job or study trial this run belongs to; the run is then filed as a child of
    that grid's or study's parent run.
    """

    def __init__(
        self,
        tracking_cfg: DictConfig,
        run_name: str,
        tags: dict[str, str],
        sweep: SweepJob | None = None,
        reopen: str | None = None,
    ) -> None:
        """`reopen`: the id of an earlier run to continue (a shared trunk trained by several jobs)."""
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.reopened = False
        self.logged_until = -1  # a reopened run: the last step it has metrics at (not logged again)
        self.sweep = sweep
        if not tracking_cfg.enabled:
            return
        self.client, experiment_id = connect(tracking_cfg)
        if reopen:
            try:
                self.client.update_run(reopen, status="RUNNING")
                self.run_id, self.reopened = reopen, True
                self.logged_until = self._last_step()
                log.info("MLflow run %s continued", reopen)
                return
            except MlflowException:
                log.warning("MLflow run %s is not in this store; starting a new one", reopen)
        tags = {**git_state(), **tags, "mlflow.source.name": "train.py"}
        if self.sweep:
            tags.update(
                {
                    "mlflow.parentRunId": self.sweep.parent_run_id,
                    "sweep_id": self.sweep.sweep_id or self.sweep.parent_run_id,
                    "sweep_role": "job",
                    "job_num": str(self.sweep.job_num),
                    **self.sweep.tags,
                }
            )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        log.info(
            "MLflow run %s (%s) in %s, experiment %r",
            run_name,
            self.run_id,
            self.client.tracking_uri,
            tracking_cfg.experiment,
        )

    def _last_step(self) -> int:
        metrics = self.client.get_run(self.run_id).data.metrics
        steps = [m.step for key in metrics for m in self.client.get_metric_history(self.run_id, key)]
        return max(steps, default=-1)

    def metric(self, key: str) -> float | None:
        return self.client.get_run(self.run_id).data.metrics.get(key) if self.reopened else None

    def tag(self, key: str) -> str | None:
        return self.client.get_run(self.run_id).data.tags.get(key) if self.client else None

    def log_config(self, cfg: DictConfig) -> None:
        if not self.client:
            return
        params = [Param(key, value) for key, value in flatten(cfg).items()]
        if self.sweep:  # the swept keys again, grouped, so the compare view leads with what differs
            params += [Param(f"swept.{key}", value) for key, value in self.sweep.swept.items()]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])
        self.client.log_text(self.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.client:
            return
        now = get_current_time_millis()
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path) -> None:
        if self.client and path.exists():
            self.client.log_artifact(self.run_id, str(path))

    def set_tag(self, key: str, value: str) -> None:
        if self.client:
            self.client.set_tag(self.run_id, key, value)

    def end(self, status: str) -> None:
        """FINISHED / FAILED / KILLED, so no run is left RUNNING after a crash or Ctrl-C; SCHEDULED: the
        job was requeued and its next allocation reopens the run."""
        if self.client and status == "SCHEDULED":
            self.client.update_run(self.run_id, status=status)
        elif self.client:
            self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


class MlflowMetricsCallback(TrainerCallback):
    """Train loss, learning rate, eval WER/CER... at the Trainer's global step: the curves in the UI.

    Also `best_eval_wer`, the running minimum, so a sweep summary built with `search_runs` (which
    sees each metric's last value) shows the best WER of runs that failed or stopped early too.
    """

    def __init__(self, run: MlflowRun) -> None:
        self.run = run
        self.best_eval_wer = run.metric("best_eval_wer") or float("inf")  # a reopened run goes on from its minimum

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs) or state.global_step <= self.run.logged_until:
            return  # a requeued run recomputing steps an earlier allocation logged: no duplicate points
        logs = dict(logs)
        if "eval_wer" in logs:
            self.best_eval_wer = min(self.best_eval_wer, logs["eval_wer"])
            logs["best_eval_wer"] = self.best_eval_wer
        self.run.log_metrics(logs, step=state.global_step)
