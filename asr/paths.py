"""Where the project lives, so defaults (corpus cache, MLflow store) do not depend on the cwd."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_DIR = Path(__file__).resolve().parents[1]


def register_resolvers() -> None:
    """`${repo_dir:}` in conf/ resolves to the repository root (absolute)."""
    if not OmegaConf.has_resolver("repo_dir"):
        OmegaConf.register_new_resolver("repo_dir", lambda: str(REPO_DIR))
