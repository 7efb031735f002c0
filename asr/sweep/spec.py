"""What a study is, as its workers receive it: the resolved `sweep` settings, the sweep command's
train overrides and the tracking settings, JSON-serialisable so it crosses process and SLURM
boundaries (`sweep_spec.json` in the study folder)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution

from asr.hydra_seam import override_key
from asr.sweep.space import SearchSpace, SearchSpaceError, parse_space, to_overrides

EPOCHS = "trainer.epochs"
FIDELITIES = ("none", "branches")  # sweep.fidelity: independent trials, or trunks with cooldown branches as rungs


@dataclass
class SweepSpec:
    """Everything a worker needs, JSON-serialisable: it crosses process and SLURM boundaries."""

    study: dict[str, Any]  # the resolved `sweep` config node
    base_overrides: list[str]  # the sweep command's train overrides, applied to every trial
    tracking: dict[str, Any]  # the resolved `tracking` node
    parent_run_id: str | None = None
    eval_steps: int | None = None  # the trials' trainer.eval_steps: converts the pruner's warm-up evals to steps
    search_space: SearchSpace | None = field(default=None, repr=False)

    @property
    def cfg(self) -> DictConfig:
        return OmegaConf.create(self.study)

    @property
    def dir(self) -> Path:
        return Path(self.study["dir"])

    def space(self) -> SearchSpace:
        """What the sampler searches (with sweep.fidelity=branches, not the length: that is the rungs)."""
        if self.search_space is None:
            self.search_space = parse_space(self.study["params"])
            if self.fidelity == "branches":
                self.search_space.distributions.pop(EPOCHS, None)
                self.search_space.grid_values.pop(EPOCHS, None)
        return self.search_space

    @property
    def prune_metric(self) -> str:
        """What trials report to the pruner: sweep.pruner.metric, or the metric the study optimises."""
        return self.cfg.pruner.get("metric") or self.cfg.metric

    @property
    def fidelity(self) -> str:
        return self.study.get("fidelity") or "none"

    def rungs(self) -> list[float]:
        """sweep.fidelity=branches: the lengths a trial's branches are trained to (trainer.epochs), shortest first."""
        return sorted(float(value) for value in parse_space(self.study["params"]).distributions[EPOCHS].choices)

    def check_fidelity(self) -> None:
        """sweep.fidelity=branches takes its rungs from a choice of trainer.epochs: anything else is refused."""
        if self.fidelity not in FIDELITIES:
            raise SearchSpaceError(f"sweep.fidelity={self.fidelity!r}. Fix: one of {', '.join(FIDELITIES)}")
        if self.fidelity == "branches":
            epochs = parse_space(self.study["params"]).distributions.get(EPOCHS)
            if not isinstance(epochs, CategoricalDistribution) or len(epochs.choices) < 2:
                raise SearchSpaceError(
                    "sweep.fidelity=branches trains each trial's rungs at the lengths of sweep.params.trainer.epochs, "
                    "which is not a choice of two or more. Fix: sweep.params.trainer.epochs='choice(2,4,8)'"
                )

    def trial_overrides(self, params: dict[str, Any] | None = None) -> list[str]:
        """What a trial passes to train.py's config: the study file's fixed values, then the sweep's
        command line (it wins over the file), then the sampled values."""
        given = {override_key(line) for line in self.base_overrides}
        fixed = [line for line in self.space().fixed if override_key(line) not in given]
        return [*fixed, *self.base_overrides, *to_overrides(params or {})]

    def check_command_line(self) -> None:
        """A command-line value for a swept key would be silently replaced by the sampled one: refuse it."""
        swept = set(self.space().distributions)
        clash = sorted({override_key(line) for line in self.base_overrides} & swept)
        if clash:
            key = clash[0]
            raise SearchSpaceError(
                f"{', '.join(clash)} is searched by the study (sweep.params), so a value for it on the command line "
                f"would be ignored. Fix: drop it from the command line, change its range with "
                f"\"sweep.params.{key}='<range>'\", or fix it for every trial with sweep.params.{key}=<value>"
            )

    def save(self, path: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "search_space"}
        path.write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: Path) -> SweepSpec:
        return cls(**json.loads(Path(path).read_text()))


def train_overrides(task_overrides: list[str]) -> list[str]:
    """The sweep command line minus the study's own settings: what every trial passes to train.py's config."""
    return [o for o in task_overrides if not o.lstrip("+~").startswith(("sweep", "hydra"))]


def spec_from_config(cfg: DictConfig, task_overrides: list[str]) -> SweepSpec:
    """sweep.py's composed config (conf/study.yaml) + its command line → the spec its workers share."""
    spec = SweepSpec(
        study=OmegaConf.to_container(cfg.sweep, resolve=True),
        base_overrides=train_overrides(list(task_overrides)),
        tracking=OmegaConf.to_container(cfg.tracking, resolve=True),
    )
    spec.check_command_line()
    spec.check_fidelity()
    return spec
