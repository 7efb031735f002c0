"""What this project needs from Hydra beyond `@hydra.main`, in one place.

- Which sweeper and launcher a config uses, from their plugin classes (`sweeper_kind`, `launcher_kind`):
  a subclass of a launcher is still that launcher.
- Override lines: their key (`override_key`), and the sweep parameters of a preset merged with the
  command line the same way everywhere (`params_not_given`, `sweep_overrides`): the command line wins.
- The jobs of a basic `-m` grid, as Hydra's own sweeper would launch them (`grid_jobs`).
- One submitit executor builder for the SLURM launcher and the study driver (`submitit_executor`).
- Hydra's internal BasicSweeper, behind one version-guarded import (`basic_sweeper`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf


def basic_sweeper() -> type:
    """Hydra's basic sweeper class (not public API: checked against hydra-core 1.3; pyproject.toml pins
    hydra-core>=1.3.2,<1.4). Looked up at each call: Hydra's plugin scan executes its module again, and a
    class kept from before the scan is not the one its methods expect."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    except ImportError as err:  # pragma: no cover  (a Hydra release that moved it)
        raise ImportError(
            f"this hydra-core has no hydra._internal.core_plugins.basic_sweeper ({err}). "
            "Fix: pip install 'hydra-core>=1.3.2,<1.4' (the version asr is tested with)"
        ) from err
    return BasicSweeper


__all__ = [
    "basic_sweeper",
    "grid_jobs",
    "launcher_kind",
    "override_key",
    "params_not_given",
    "submitit_executor",
    "submitit_launcher",
    "sweep_overrides",
    "sweeper_kind",
]


def _plugin_class(node: Any) -> type | None:
    target = node.get("_target_") if node is not None else None
    if not target:
        return None
    try:
        return get_class(str(target))
    except Exception:  # noqa: BLE001  (an unknown class is Hydra's error to report, at launch)
        return None


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_a(cls: type, base: type) -> bool:
    """issubclass by qualified name: Hydra's plugin scan may import a plugin module a second time, so the
    same class can exist as two objects."""
    return _name(base) in {_name(k) for k in cls.__mro__}


def sweeper_kind(hydra_cfg: DictConfig) -> str:
    """`optuna` (hydra/sweeper=optuna), `branches` (hydra/sweeper=branches) or `grid` (Hydra's basic sweeper)."""
    cls = _plugin_class(hydra_cfg.get("sweeper"))
    if cls is None:
        return "grid"
    from hydra_plugins.asr_branches_sweeper.branches_sweeper import BranchesSweeper
    from hydra_plugins.asr_optuna_sweeper.optuna_sweeper import OptunaSweeper

    if _is_a(cls, OptunaSweeper):
        return "optuna"
    return "branches" if _is_a(cls, BranchesSweeper) else "grid"


def launcher_kind(launcher_cfg: DictConfig | None) -> str:
    """`slurm` (submitit on SLURM), `local` (submitit's local processes) or `basic` (one job after the other)."""
    cls = _plugin_class(launcher_cfg)
    if cls is None:
        return "basic"
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

    if _is_a(cls, SlurmLauncher):
        return "slurm"
    return "local" if _is_a(cls, LocalLauncher) else "basic"


def submitit_launcher(launcher_cfg: DictConfig | None) -> DictConfig | None:
    """The launcher config when it runs jobs through submitit (SLURM or local processes), else None."""
    return launcher_cfg if launcher_kind(launcher_cfg) in ("slurm", "local") else None


def override_key(line: str) -> str:
    """`trainer.lr` of `trainer.lr=1e-3`, `+trainer.extra.x=1`, `~trainer.x`; `model` of `model=tiny`."""
    return line.split("=", 1)[0].lstrip("+~")


def flatten_params(params: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """`trainer.lr: ...` in a sweep file and `sweep.params.trainer.lr=...` on the command line (nested) alike."""
    flat: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def params_not_given(params: Mapping[str, Any] | None, command_line: list[str]) -> dict[str, Any]:
    """A preset's sweep parameters (`hydra.sweeper.params`, flattened) minus the keys the command line sets:
    the command line wins."""
    given = {override_key(line) for line in command_line}
    return {key: value for key, value in flatten_params(params).items() if key not in given}


def sweep_overrides(config: DictConfig) -> list[str]:
    """A `-m` grid's command-line overrides plus the preset's `hydra.sweeper.params` it does not set."""
    overrides = list(config.hydra.overrides.task)
    params = params_not_given(config.hydra.sweeper.get("params"), overrides)
    return overrides + [f"{key}={value}" for key, value in params.items()]


def sweep_keys(overrides: list[str]) -> list[str]:
    """The keys a list of overrides sweeps (`trainer.lr=1e-3,3e-3` → `trainer.lr`)."""
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def grid_jobs(overrides: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """What Hydra's basic sweeper would launch for `-m` with these overrides: (job number, overrides, swept)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    swept_keys = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    batches = basic_sweeper().split_arguments(parsed, max_batch_size=None)[0]
    return [(str(i), job, [o for o in job if override_key(o) in swept_keys]) for i, job in enumerate(batches)]


def submitit_executor(params: Mapping[str, Any], cluster: str, folder: str | Path):
    """A submitit executor from a hydra-submitit-launcher config's settings (hydra/launcher=slurm,
    local_parallel): the launcher's own keys (timeout_min, gpus_per_node...) as they are, the others
    (partition, signal_delay_s...) prefixed with the cluster, `max_num_timeout` at construction."""
    import submitit

    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = {k: v for k, v in params.items() if k not in ("_target_", "submitit_folder")}
    init = {f"{cluster}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{cluster}_{k}": v for k, v in params.items()})
    return executor
