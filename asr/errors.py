"""Errors a user can fix (a bad path, value or override): shown as one line, never as a traceback.

Every command (`train.py`, `sweep.py`, `python -m asr.<tool>`) runs through `asr.cli`, which
prints a `UserError` as `error: <what went wrong>. Fix: <what to do>` on stderr and exits 1.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's data, config or command line; the message names the fix."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (unknown option, impossible value, missing input)."""


class RunPruned(Exception):
    """Raised by a callback that stops a hopeless run early (a sweep's pruner). `asr.pipeline.run`
    closes the run's MLflow run FINISHED with `trial_state=PRUNED` and re-raises it."""
