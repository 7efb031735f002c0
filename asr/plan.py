"""A plan before anything is submitted: every job's config composed and checked, and its GPU-hours.

    python train.py -m hydra/launcher=slurm experiment=seed_8_20_40 dataset=openslr54 plan=true
    python sweep.py hydra/launcher=slurm sweep=lr_epochs ... sweep.plan=true

Per job: the swept values, epochs, audio hours per epoch (train split), GPU-hours (training + the
periodic dev-set evaluations) and peak GPU memory, then the total; nothing is submitted. Throughput
comes from earlier MLflow runs of the same model and trainer settings (`train_audio_seconds_per_second`),
else from our H200 measurements (asr/estimate.py); the plan says which it used.
"""

from __future__ import annotations

import logging
import math
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from asr.estimate import GPU, VARIABLE_LENGTH_NOTE, JobPlan, checkpoint_gib, compose_job, plan_jobs
from asr.hydra_seam import grid_jobs, launcher_kind, override_key, sweep_overrides, sweeper_kind

log = logging.getLogger(__name__)


def fmt(value: float | None, digits: int = 1) -> str:
    return "?" if value is None else f"{value:,.{digits}f}"


def render(plans: list[JobPlan], title: str, multiplier: int = 1) -> str:
    header = ["job", "swept values", "epochs", "audio h/epoch", f"{GPU} GPU-h", "peak GiB"]
    rows = [
        [
            p.job,
            p.swept or "-",
            fmt(p.epochs, 2).rstrip("0").rstrip("."),
            fmt(p.audio_hours),
            fmt(p.gpu_hours),
            fmt(p.peak_gib),
        ]
        if not p.error
        else [p.job, p.swept or "-", "ERROR", p.error, "", ""]
        for p in plans
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [title, line(header), line(["-" * w for w in widths]), *map(line, rows)]
    known = [p.gpu_hours for p in plans if p.gpu_hours is not None]
    total = sum(known) * multiplier
    unknown = sum(p.gpu_hours is None for p in plans)
    out.append(
        f"total: {total:,.1f} {GPU} GPU-hours"
        + (f" (x{multiplier} trials)" if multiplier > 1 else "")
        + (f"; {unknown} job(s) without an estimate" if unknown else "")
    )
    for note in sorted(
        {f"throughput: {p.source}" for p in plans if p.source} | {f"data: {p.data}" for p in plans if p.data}
    ):
        out.append(f"  {note}")
    if any("seed" in p.source and "measurement" in p.source for p in plans):
        out.append(f"  note: {VARIABLE_LENGTH_NOTE}")
    return "\n".join(out)


def shared_trunk_line(jobs: list[tuple[str, list[str], list[str]]], plans: list[JobPlan], cooldown: float) -> str:
    """What `hydra/sweeper=branches` trains of these jobs: per trunk, its longest fork plus every cooldown."""
    groups: dict[tuple[str, ...], list[JobPlan]] = {}
    for (_, overrides, _), plan in zip(jobs, plans):
        key = tuple(o for o in overrides if override_key(o) != "trainer.epochs")
        groups.setdefault(key, []).append(plan)
    epochs_alone = epochs_shared = hours = 0.0
    for group in groups.values():
        lengths = [p.epochs or 0.0 for p in group]
        alone, shared = sum(lengths), max(lengths) * (1 - cooldown) + cooldown * sum(lengths)
        epochs_alone, epochs_shared = epochs_alone + alone, epochs_shared + shared
        if all(p.gpu_hours is not None for p in group) and alone:
            hours += sum(p.gpu_hours for p in group) * shared / alone
    ratio = epochs_shared / epochs_alone if epochs_alone else float("nan")
    return (
        f"with hydra/sweeper=branches (cooldown {cooldown:.0%}): {epochs_shared:,.1f} of these {epochs_alone:,.1f} "
        f"epochs ({ratio:.2f}), ~{hours:,.1f} {GPU} GPU-hours"
    )


def disk_line(jobs: list[tuple[str, list[str], list[str]]], shared: bool) -> str | None:
    """The checkpoints a grid keeps on disk at most: `save_total_limit` per job; a shared-trunk grid adds
    its trunk's own and its forks (every one with branch.keep_forks, else the newest two)."""
    cfg = compose_job(jobs[0][1])
    try:
        each = checkpoint_gib(cfg)
    except Exception as err:  # noqa: BLE001  (a plan line; the plan itself must go on)
        log.warning("plan: no checkpoint size for model %s (%s)", cfg.model.name, err)
        return None
    if each is None:
        return None
    limit = cfg.trainer.save_total_limit or 1
    count = len(jobs) * limit
    what = f"{len(jobs)} job(s) x {limit}"
    if shared:
        forks = len(jobs) if cfg.branch.keep_forks else min(2, len(jobs))
        count += limit + forks
        what += f" + the trunk's {limit} + {forks} fork(s)"
    return f"disk: up to {count * each:,.1f} GiB of checkpoints ({what}, {each:,.2f} GiB each)"


def allocation_lines(plans: list[JobPlan], launcher: DictConfig | None) -> list[str]:
    """A SLURM launcher's time limit against each job's GPU-hours: how many allocations (a job
    requeued on its time limit resumes from its checkpoint, asr/requeue.py) and whether
    `max_num_timeout` allows them."""
    if launcher is None or not launcher.get("timeout_min"):
        return []
    usable_h = (launcher.timeout_min - launcher.get("signal_delay_s", 0) / 60) / 60
    allowed = int(launcher.get("max_num_timeout") or 0) + 1
    lines = []
    for plan in plans:
        if plan.gpu_hours is None or usable_h <= 0:
            continue
        needed = max(1, math.ceil(plan.gpu_hours / usable_h))
        line = (
            f"job {plan.job}: {plan.gpu_hours:,.1f} GPU-h in allocations of {launcher.timeout_min / 60:g} h: {needed}"
        )
        if needed > allowed:
            line = (
                f"WARNING: {line}, but hydra.launcher.max_num_timeout={allowed - 1} allows {allowed}: it would stop "
                f"unfinished. Fix: hydra.launcher.max_num_timeout={needed} (or a longer timeout_min)"
            )
        lines.append(line)
    return lines


def print_plan(
    jobs: list[tuple[str, list[str], list[str]]],
    title: str,
    multiplier: int = 1,
    cooldown: float | None = None,
    launcher: DictConfig | None = None,
) -> int:
    """Print the table (and what trainer=gpu_fast would take); 1 if any job does not compose.
    `cooldown`: the grid shares a trunk (hydra/sweeper=branches), with this cooldown fraction.
    `launcher`: a SLURM launcher's config: each job's allocations under its time limit."""
    plans = plan_jobs(jobs)
    print(render(plans, title, multiplier))
    if not any(p.error for p in plans) and (line := disk_line(jobs, shared=cooldown is not None)):
        print(line)
    for line in allocation_lines(plans, launcher):
        print(line, file=sys.stderr if line.startswith("WARNING") else sys.stdout)
    if cooldown is not None and not any(p.error for p in plans):
        print(shared_trunk_line(jobs, plans, cooldown))
    fast = [(n, [*o, "trainer=gpu_fast"], s) for n, o, s in jobs if not any(x.startswith("trainer=") for x in o)]
    if fast and not any(p.error for p in plans):
        fast_plans = plan_jobs(fast)
        known = [p.gpu_hours for p in fast_plans if p.gpu_hours is not None]
        if known and len(known) == len(fast_plans) and "gpu_fast" not in " ".join(p.source for p in plans):
            print(f"with trainer=gpu_fast: {sum(known) * multiplier:,.1f} {GPU} GPU-hours ({fast_plans[0].source})")
    errors = [p for p in plans if p.error]
    if errors:
        print(f"error: {len(errors)} job(s) do not compose (see the table); nothing submitted", file=sys.stderr)
        return 1
    print("plan only: nothing submitted (drop plan=true to run)")
    return 0


def check_shared_trunk(jobs: list[tuple[str, list[str], list[str]]]) -> None:
    """`hydra/sweeper=branches plan=true`: a grid whose settings cannot share a trunk ends in the run's own
    one-line error (wrong schedule, trainer.max_steps, a warm-up ratio), not in a plan of a grid that
    would never start."""
    from asr import branches
    from asr.cli import fail
    from asr.errors import UserError

    for _, overrides, _ in jobs:
        try:
            branches.check_settings(compose_job(overrides))
        except UserError as err:
            fail(str(err))


class PlanCallback(Callback):
    """`train.py -m ... plan=true`: print the plan of the grid and exit before the launcher submits anything."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not config.get("plan"):
            return
        if sweeper_kind(config.hydra) == "optuna":
            print(
                "error: plan=true plans Hydra grids; for an Optuna study use `python sweep.py ... sweep.plan=true`",
                file=sys.stderr,
            )
            raise SystemExit(1)
        overrides = [o for o in sweep_overrides(config) if override_key(o) != "plan"]
        launcher = launcher_kind(config.hydra.launcher)
        try:
            jobs = grid_jobs(overrides)
        except Exception as err:  # noqa: BLE001  (e.g. interval() sweeps, which only the Optuna sweeper takes)
            print(f"error: cannot list the grid's jobs: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        shared = sweeper_kind(config.hydra) == "branches"
        title = f"Plan of `train.py -m` ({launcher} launcher): {' '.join(overrides)}"
        if shared:  # refused here exactly as the run refuses it (hydra_plugins/asr_branches_sweeper)
            check_shared_trunk(jobs)
        cooldown = config.trainer.cooldown_fraction if shared else None
        slurm = config.hydra.launcher if launcher == "slurm" else None
        raise SystemExit(print_plan(jobs, title, cooldown=cooldown, launcher=slurm))


def study_jobs(spec) -> tuple[list[tuple[str, list[str], list[str]]], int, str]:
    """sweep.py's trials as plan rows: every grid point; for sampled studies one row per combination of the
    categorical choices, numeric parameters at their upper bound (so the total is an upper bound)."""
    import itertools

    from optuna.distributions import CategoricalDistribution

    from asr.sweep.space import to_overrides
    from asr.sweep.trial import n_trials_total

    space, total = spec.space(), n_trials_total(spec)
    base = [*spec.base_overrides, *space.fixed]
    if spec.study["sampler"]["name"] == "grid":
        points = space.grid()
        return [(f"trial {i}", [*base, *to_overrides(p)], to_overrides(p)) for i, p in enumerate(points)], 1, "grid"
    categorical = {k: d.choices for k, d in space.distributions.items() if isinstance(d, CategoricalDistribution)}
    highs = {k: d.high for k, d in space.distributions.items() if k not in categorical}
    rows = []
    for combo in itertools.product(*categorical.values()) if categorical else [()]:
        params = {**dict(zip(categorical, combo)), **highs}
        rows.append((f"trials (any of {total})", [*base, *to_overrides(params)], to_overrides(params)))
    if len(rows) > 1:  # the costliest combination bounds every trial
        return rows, total, "upper bound per trial: the costliest row counts for every trial; pruning stops many early"
    return rows, total, "upper bound: numeric parameters at their maximum, no trial pruned"


def print_study_plan(spec) -> int:
    jobs, multiplier, how = study_jobs(spec)
    title = f"Plan of study {spec.study['study_name']!r}: {spec.study['sampler']['name']} sampler, {how}"
    if multiplier > 1 and len(jobs) > 1:
        plans = plan_jobs(jobs)
        worst = max(plans, key=lambda p: p.gpu_hours or 0)
        jobs = [next(j for j in jobs if j[0] == worst.job and " ".join(j[2]) == worst.swept)]
    return print_plan(jobs, title, multiplier)
