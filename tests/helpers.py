"""Helpers the test modules share: free ports, running the project's commands as a user would, and a real
MLflow tracking server. Fixtures built on them live in conftest.py (the corpus overrides, the learned model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from asr.paths import REPO_DIR


def free_port() -> int:
    """A TCP port nothing listens on now (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python(
    *args: str, cwd: Path = REPO_DIR, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`python <args>` with this interpreter, as a user runs it (no HYDRA_FULL_ERROR unless `env` sets it)."""
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout
    )


def train_py(*args: str, cwd: Path = REPO_DIR, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python train.py <args>`."""
    return python(str(REPO_DIR / "train.py"), *args, cwd=cwd, env=env)


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A real `mlflow server` on an SQLite backend in `folder`, as users run one for a cluster; yields its URI."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--workers", "1"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("mlflow server exited during start-up") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not answer within 60 s") from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
