"""One MLflow parent run per Optuna study; every trial's run is its child.

The parent's id lives in the study itself (a study user attribute), so rerunning the same
sweep command re-attaches to the same parent instead of opening a second one, and every
worker, on any node, files its trials under it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from asr.hydra_seam import flatten_params
from asr.sweep.spec import SweepSpec
from asr.sweep.storage import safe_url, storage_url
from asr.sweep.trial import n_trials_total
from asr.tracking import TrackingUnavailableError, close_parent_run, connect, create_parent_run

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"


def _client(spec: SweepSpec) -> tuple[MlflowClient, str]:
    try:
        return connect(OmegaConf.create(spec.tracking))
    except TrackingUnavailableError as err:
        raise TrackingUnavailableError(f"not starting the sweep: {err}") from err


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
            log.warning(
                "Study %r: its parent run %s is not in %s; opening a new one",
                study.study_name,
                run_id,
                client.tracking_uri,
            )
    cfg = spec.study
    tags = {
        "sweep_dir": str(spec.dir.resolve()),
        "optuna_study": cfg["study_name"],
        "optuna_storage": safe_url(storage_url(cfg)),
        "overrides": " ".join(spec.base_overrides),
        "launcher": "optuna",
    }
    params = {
        "sampler": cfg["sampler"]["name"],
        "pruner": cfg["pruner"]["name"],
        "n_trials": n_trials_total(spec),
        "workers": cfg["workers"],
        "metric": cfg["metric"],
        "direction": cfg["direction"],
        "swept_keys": ",".join(flatten_params(cfg["params"])),
        **{f"space.{k}": v for k, v in flatten_params(cfg["params"]).items()},
    }
    run_id = create_parent_run(client, experiment_id, f"study {cfg['study_name']}", tags, params)
    study.set_user_attr(PARENT_ATTR, run_id)
    log.info("Study %r: MLflow parent run %s in %s", study.study_name, run_id, client.tracking_uri)
    return run_id


def close_parent(study: optuna.Study, spec: SweepSpec, table: pd.DataFrame, files: list[Path], status: str) -> None:
    """Leaderboard, best.yaml and plots as artifacts; best value and trial counts as metrics."""
    run_id = spec.parent_run_id
    if not run_id:
        return
    client, _ = _client(spec)
    metrics = {
        f"trials_{state.lower()}": int(n) for state, n in (table["state"].value_counts().items() if len(table) else [])
    }
    tags = {}
    if len(table):
        metrics["train_steps_total"] = int(table["steps"].sum())
        complete = table[table["state"] == "COMPLETE"]
        if len(complete):
            best = complete.iloc[0]
            metrics["best_eval_wer"] = float(best["value"])
            tags["best_trial"] = str(int(best["trial"]))
            if best["mlflow_run_id"]:
                tags["best_run_id"] = best["mlflow_run_id"]
    close_parent_run(
        client,
        run_id,
        status,
        metrics,
        tags,
        [(path, "plots" if path.suffix == ".png" else None) for path in files if path],
    )
    log.info("Study %r: parent run %s closed %s", study.study_name, run_id, status)
