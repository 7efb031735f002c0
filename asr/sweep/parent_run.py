"""One MLflow parent run per Optuna study; every trial's run is its child.

The parent's id lives in the study itself (a study user attribute), so rerunning the same
sweep command re-attaches to the same parent instead of opening a second one, and every
worker, on any node, files its trials under it.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis
from omegaconf import OmegaConf

from asr.sweep.space import flatten_params
from asr.sweep.study import SweepSpec, n_trials_total, storage_url
from asr.tracking import TrackingUnavailableError, connect, git_state

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"


def _client(spec: SweepSpec) -> tuple[MlflowClient, str]:
    try:
        return connect(OmegaConf.create(spec.tracking))
    except TrackingUnavailableError as err:
        raise TrackingUnavailableError(f"not starting the sweep: {err}") from err


def safe_url(url: str) -> str:
    """The storage URL without its password, for tags and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_parent(study: optuna.Study, spec: SweepSpec) -> str | None:
    """The study's parent run: re-opened if the study already has one, else created and recorded."""
    if not spec.tracking.get("enabled"):
        return None
    client, experiment_id = _client(spec)
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "resumed_at", f"{datetime.now():%Y-%m-%d %H:%M:%S}")
            log.info("Study %r: re-attached to MLflow parent run %s", study.study_name, run_id)
            return run_id
        except MlflowException:
            log.warning("Study %r: its parent run %s is not in %s; opening a new one", study.study_name, run_id, client.tracking_uri)
    cfg = spec.study
    tags = {**git_state(), "sweep_role": "parent", "sweep_dir": str(spec.dir.resolve()), "optuna_study": cfg["study_name"],
            "optuna_storage": safe_url(storage_url(cfg)), "overrides": " ".join(spec.base_overrides), "launcher": "optuna"}
    run_id = client.create_run(experiment_id, run_name=f"study {cfg['study_name']}", tags=tags).info.run_id
    client.set_tag(run_id, "sweep_id", run_id)
    params = {"sampler": cfg["sampler"]["name"], "pruner": cfg["pruner"]["name"], "n_trials": n_trials_total(spec),
              "workers": cfg["workers"], "metric": cfg["metric"], "direction": cfg["direction"],
              "swept_keys": ",".join(flatten_params(cfg["params"])), **{f"space.{k}": v for k, v in flatten_params(cfg["params"]).items()}}
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    study.set_user_attr(PARENT_ATTR, run_id)
    log.info("Study %r: MLflow parent run %s in %s", study.study_name, run_id, client.tracking_uri)
    return run_id


def close_parent(study: optuna.Study, spec: SweepSpec, table: pd.DataFrame, files: list[Path], status: str) -> None:
    """Leaderboard, best.yaml and plots as artifacts; best value and trial counts as metrics."""
    run_id = spec.parent_run_id
    if not run_id:
        return
    client, _ = _client(spec)
    for path in files:
        if path and path.exists():
            client.log_artifact(run_id, str(path), artifact_path="plots" if path.suffix == ".png" else None)
    now = get_current_time_millis()
    metrics = {f"trials_{state.lower()}": int(n) for state, n in (table["state"].value_counts().items() if len(table) else [])}
    if len(table):
        metrics["train_steps_total"] = int(table["steps"].sum())
        complete = table[table["state"] == "COMPLETE"]
        if len(complete):
            best = complete.iloc[0]
            metrics["best_eval_wer"] = float(best["value"])
            client.set_tag(run_id, "best_trial", str(int(best["trial"])))
            if best["mlflow_run_id"]:
                client.set_tag(run_id, "best_run_id", best["mlflow_run_id"])
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
    log.info("Study %r: parent run %s closed %s", study.study_name, run_id, status)
