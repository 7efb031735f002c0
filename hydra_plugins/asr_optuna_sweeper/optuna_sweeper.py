"""A Hydra Sweeper that runs `train.py -m` as an Optuna study with the asr.sweep engine.

    python train.py -m hydra/sweeper=optuna 'trainer.lr=tag(log,interval(1e-5,1e-3))' trainer.epochs=2,4 \
        hydra.sweeper.n_trials=12 hydra.sweeper.workers=2

Swept overrides on the command line (and an experiment's `hydra.sweeper.params`) form the
search space; the other overrides apply to every trial. Pruning, workers, storage, resume,
the MLflow parent run and the report are the same as `sweep.py`'s: this class only translates
Hydra's sweeper call into a SweepSpec. Settings: conf/hydra/sweeper/optuna.yaml.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config

    def sweep(self, arguments: list[str]) -> Any:
        import asr  # noqa: F401  (the ${repo_dir:} resolver)
        from asr.hydra_seam import params_not_given, submitit_launcher
        from asr.sweep import SweepSpec, run_study
        from asr.sweep.space import split_sweep_overrides

        assert self.config is not None
        study = OmegaConf.to_container(OmegaConf.create(self.settings), resolve=True)
        swept, fixed = split_sweep_overrides(list(arguments))
        # An experiment's hydra.sweeper.params join the space; the command line wins over them.
        study["params"] = {**params_not_given(study.get("params"), list(arguments)), **swept}
        spec = SweepSpec(
            study=study, base_overrides=fixed, tracking=OmegaConf.to_container(self.config.tracking, resolve=True)
        )
        return run_study(spec, submitit_launcher(self.config.hydra.launcher))
