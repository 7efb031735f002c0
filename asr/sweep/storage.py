"""Where a study lives: the storage URL, an RDB storage with heartbeats (SQLite made safe for several
workers), and the few private Optuna calls the sweep engine needs, kept together here.

Optuna has no public API to force a trial's state, to read a trial back from the storage by id, or
to read a running trial's system attributes (where its retry history lives); the functions at the
end of this module reach for them. They were checked against the versions in CHECKED_OPTUNA
(pyproject pins optuna < 6), and tests/test_sweep.py exercises each one, so a new Optuna that
changes them fails that test loudly rather than a study in the middle of the night.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

CHECKED_OPTUNA = ("5.0", "5.1")  # optuna releases (major.minor) the private calls below were read and tested against


def storage_url(study_cfg: DictConfig | dict) -> str:
    """sweep.storage, or an SQLite file in the sweep folder (inspectable, heartbeats, optuna-dashboard)."""
    return study_cfg["storage"] or f"sqlite:///{Path(study_cfg['dir']) / 'optuna.db'}"


def open_storage(study_cfg: DictConfig | dict) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats: a worker that dies (kill -9, node lost) has its trial failed
    after `grace_period` seconds and re-queued with the same parameters (`max_retry` times)."""
    url = storage_url(study_cfg)
    if url.endswith((".log", ".journal")):  # a JournalFileBackend file: no DB at all, but no heartbeats
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        log.warning(
            "sweep.storage=%s is a journal file: a worker killed mid-trial leaves that trial RUNNING "
            "(journal storages have no heartbeat); prefer sqlite:/// or postgresql://",
            url,
        )
        return JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():  # heartbeats have been "experimental" since optuna 2.8; we rely on them knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _rdb_storage(url, engine_kwargs, study_cfg)


def _rdb_storage(url: str, engine_kwargs: dict, study_cfg) -> RDBStorage:
    storage = RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=study_cfg["heartbeat_interval"],
        grace_period=study_cfg["grace_period"],
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
            max_retry=study_cfg["max_retry"], inherit_intermediate_values=True
        ),
    )
    if url.startswith("sqlite"):
        serialize_sqlite_transactions(storage.engine)
    return storage


def serialize_sqlite_transactions(engine) -> None:
    """Make SQLite transactions take the write lock when they begin (BEGIN IMMEDIATE).

    Optuna claims a queued trial with "read WAITING, then write RUNNING" in one transaction and
    relies on SELECT ... FOR UPDATE, which SQLite ignores; and Python's sqlite3 only opens the
    transaction at the write. Two workers could then both read WAITING and both run the same grid
    point (seen in testing). SQLAlchemy's documented recipe: let SQLAlchemy emit the BEGIN itself.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed are closed


def safe_url(url: str) -> str:
    """The storage URL without its password, for tags and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# ---- Optuna internals, in one place (see the module docstring) --------------------------------
def mark_failed(study: optuna.Study, trial: FrozenTrial) -> None:
    """Set a RUNNING trial FAIL (a worker stopped by SIGTERM could not close it itself)."""
    try:
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def stored_trial(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial:
    """The trial as the storage holds it now."""
    return study._storage.get_trial(trial._trial_id)


def system_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """A running trial's system attributes (optuna.Trial has no public accessor since optuna 3)."""
    return trial._get_latest_trial().system_attrs
