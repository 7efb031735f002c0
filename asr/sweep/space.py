"""Search spaces written in Hydra's override grammar, turned into Optuna distributions.

Users already know `choice()`, `range()`, `interval()` and `tag(log, ...)` from Hydra's
command line, so a sweep file reads like the overrides it will produce. Hydra's own parser
does the parsing; this module only maps its sweep objects onto `optuna.distributions`:

    trainer.lr: tag(log, interval(1e-5, 1e-3))   → FloatDistribution(1e-5, 1e-3, log=True)
    trainer.warmup_steps: int(interval(10, 200)) → IntDistribution(10, 200)
    trainer.epochs: choice(8, 20, 40)            → CategoricalDistribution([8, 20, 40])
    trainer.batch_size: range(4, 17, 4)          → IntDistribution(4, 16, step=4)
    model: choice(tiny, w2v_bert_2)              → a config-group choice, categorical too
    trainer.grad_accum: 2                        → not swept: a fixed override for every trial
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from asr.errors import UserError
from asr.hydra_seam import flatten_params


class SearchSpaceError(UserError, ValueError):
    """A sweep parameter Optuna cannot search; the message names the fix."""


@dataclass
class SearchSpace:
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)  # plain overrides applied to every trial
    grid_values: dict[str, list[Any]] = field(default_factory=dict)  # only for choice()/range()

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the swept values, in a stable order: what `sampler: grid` enqueues."""
        missing = [key for key in self.distributions if key not in self.grid_values]
        if missing:
            raise SearchSpaceError(
                f"sweep.sampler=grid needs a finite list of values, but {', '.join(missing)} "
                "is an interval(). Fix: write choice(a, b, ...) or range(start, stop, step), or use sampler tpe/random"
            )
        keys = list(self.grid_values)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid_values[k] for k in keys))]


def _range_values(sweep: RangeSweep) -> list[Any]:
    """Exactly the values `python train.py -m key=range(...)` would run (Hydra's own range), floats tidied."""
    values = list(sweep.range())
    return values if all(isinstance(v, int) for v in values) else [round(float(v), 12) for v in values]


def to_distribution(key: str, sweep: Any) -> tuple[BaseDistribution, list[Any] | None]:
    """One Hydra sweep object → (Optuna distribution, grid values or None for continuous ones)."""
    log = "log" in getattr(sweep, "tags", set())
    if isinstance(sweep, IntervalSweep):
        if sweep.start >= sweep.end:
            raise SearchSpaceError(f"{key}: interval({sweep.start}, {sweep.end}) is empty; the lower bound comes first")
        if log and sweep.start <= 0:
            raise SearchSpaceError(f"{key}: tag(log, ...) needs a lower bound > 0, got {sweep.start}")
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log), None
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log), None
    if isinstance(sweep, RangeSweep):
        if sweep.shuffle:
            raise SearchSpaceError(f"{key}: shuffle(range(...)) means nothing to Optuna; drop shuffle()")
        values = _range_values(sweep)
        if not values:
            raise SearchSpaceError(f"{key}: range({sweep.start}, {sweep.stop}, {sweep.step}) has no values")
        if log:
            raise SearchSpaceError(f"{key}: tag(log, range(...)) is not supported; use tag(log, int(interval(a, b)))")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=sweep.step), values
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(sweep.step)), values
    if isinstance(sweep, ChoiceSweep):
        if log:
            raise SearchSpaceError(f"{key}: tag(log, choice(...)) is not supported; a choice is a plain list")
        values = list(sweep.list)
        if not values or any(isinstance(v, (list, dict)) for v in values):
            raise SearchSpaceError(f"{key}: choice() needs one or more plain values (numbers, strings, booleans, null)")
        return CategoricalDistribution(values), values
    raise SearchSpaceError(f"{key}: {sweep!r} is not a sweep Optuna can search; use choice(), range() or interval()")


def parse_space(params: Mapping[str, Any]) -> SearchSpace:
    """`sweep.params` (key → Hydra override value) → a SearchSpace; errors name the offending key."""
    parser = OverridesParser.create()
    space = SearchSpace()
    for key, value in flatten_params(params).items():
        line = f"{key}={value}"
        try:
            override: Override = parser.parse_override(line)
        except Exception as err:  # noqa: BLE001  (Hydra raises OverrideParseException and friends)
            raise SearchSpaceError(f"sweep.params: cannot parse {line!r}: {err}") from err
        if not override.is_sweep_override():
            space.fixed.append(line)
            continue
        distribution, grid_values = to_distribution(key, override.value())
        space.distributions[key] = distribution
        if grid_values is not None:
            space.grid_values[key] = grid_values
    return space


def split_sweep_overrides(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    """Command-line overrides (the Sweeper plugin's door) → (swept key → its sweep text, the plain rest)."""
    params: dict[str, str] = {}
    rest: list[str] = []
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_sweep_override():
            params[override.key_or_group] = override.input_line.split("=", 1)[1]
        else:
            rest.append(override.input_line)
    return params, rest


def format_value(value: Any) -> str:
    """A sampled value as Hydra override text (floats keep full precision, None is null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_overrides(params: Mapping[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in params.items()]
