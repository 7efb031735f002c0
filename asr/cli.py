"""How every command ends: a user's mistake in one line on stderr, a bug with its traceback.

    error: dataset.root=/data/openslr54 does not exist. Fix: download ...   (exit status 1)
    error: Could not override 'trainer.epoch'. ...                          (exit status 2: bad command line)

Hydra prints a stripped traceback for every exception a task raises; here Hydra is told to
re-raise (HYDRA_FULL_ERROR=1 for it) and the exception is sorted out once, at the top. Set
HYDRA_FULL_ERROR=1 yourself to see the full traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from asr.errors import UserError

BAD_COMMAND_LINE = 2  # as argparse, git and Hydra's own usage errors
_show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for full tracebacks


def fail(message: str, status: int = 1) -> None:
    """Print `error: <message>` (one line) on stderr and exit with `status`."""
    text = " ".join(str(message).split())
    print(f"error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _hydra_usage_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    return ConfigCompositionException, MissingConfigException, OverrideParseException


def _usage_message(err: BaseException) -> str:
    text = str(err).split("\nConfig search path", 1)[0]  # Hydra's list of search paths is noise here
    cause = err.__cause__
    return f"{text} ({cause})" if cause and str(cause) not in text else text


def run(entry: Callable[[], Any]) -> Any:
    """Call a command's main function (a @hydra.main one included) with this error policy."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    try:
        return entry()
    except UserError as err:
        if _show_tracebacks:
            raise
        fail(str(err))
    except _hydra_usage_errors() as err:
        if _show_tracebacks:
            raise
        fail(_usage_message(err), BAD_COMMAND_LINE)


@contextmanager
def user_errors() -> Iterator[None]:
    """Inside a Hydra task: a user error of a single run ends the command here, in one line.

    (Raised out of the task, Hydra would first print "Error executing job with overrides".)
    In a multirun the error stays the job's, so Hydra records that job as failed and the grid
    goes on; the multirun's summary names every failed job.
    """
    try:
        yield
    except UserError as err:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if _show_tracebacks or not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        fail(str(err))
