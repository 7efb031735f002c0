"""Shared fixtures: offline Hub, a throw-away MLflow store, one small synthetic corpus per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Set before transformers/datasets/mlflow are imported anywhere: a test must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="asr-tests-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import asr  # noqa: E402,F401  (registers ${repo_dir:})
from asr.paths import REPO_DIR  # noqa: E402

CONF_DIR = REPO_DIR / "conf"
SESSION_DIR = _SESSION_DIR
SMALL_CORPUS = [
    f"dataset.cache_dir={SESSION_DIR / 'corpus'}",
    f"paths.cache_dir={SESSION_DIR / 'cache'}",
    "dataset.sizes.train=400",
    "dataset.sizes.dev=40",
    "dataset.sizes.test=40",
]


def compose_cfg(*overrides: str, with_hydra: bool = False, config_name: str = "train") -> DictConfig:
    """The config train.py (or asr.evaluate) would run with these overrides (+ the `hydra` node if asked)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return SESSION_DIR


LEARNING_RUN = [
    *SMALL_CORPUS,
    "trainer.max_steps=300",
    "trainer.eval_steps=50",
    "trainer.logging_steps=25",
    "+trainer.extra.eval_on_start=true",  # an eval at step 0: the untrained CER
]


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """One real 300-step run of `python train.py` on the small corpus, shared by the tests that need a model:
    (its composed config, its run folder, its metrics.json)."""
    output_dir = tmp_path_factory.mktemp("run")
    result = subprocess.run(
        [sys.executable, str(REPO_DIR / "train.py"), *LEARNING_RUN, f"hydra.run.dir={output_dir}"],
        cwd=output_dir,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    cfg = OmegaConf.load(output_dir / ".hydra" / "config.yaml")
    return cfg, output_dir, json.loads((output_dir / "metrics.json").read_text())


# ---- running the suite in parallel (`make test`: pytest-xdist) ---------------------------------------------
# Each module's tests run in one process, in order, so its module-scoped fixtures are built once; the modules
# using the `learned` model share a process, so it is trained once. The longest groups start first (measured
# with --durations on 2 cores: the README commands and the SLURM cluster take a third of the suite each), so
# the two processes end together. (A scheduler of our own rather than xdist_group marks: pytest 9.2 ignores
# the node-id suffix `--dist loadgroup` relies on, pytest-xdist issue #1386.)
SHARED_GROUPS = {name: "learned" for name in ("test_training", "test_evaluate", "test_lm", "test_throughput")}
LONGEST_FIRST = [
    "test_readme",
    "test_cluster",
    "test_sweep",
    "test_branches",
    "learned",
    "test_requeue",
    "test_branch_sweep",
]


def _group(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return SHARED_GROUPS.get(module, module)


def pytest_collection_modifyitems(config, items):
    """The longest groups first (a stable sort: the order within a module stays)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """Work units are the groups above, handed out in collection order (with --no-loadscope-reorder)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return GroupScheduling(config, log)
