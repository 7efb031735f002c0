"""A plan before anything is submitted: every job's config composed and checked, and its GPU-hours.

    python train.py -m hydra/launcher=slurm experiment=seed_8_20_40 dataset=openslr54 plan=true
    python sweep.py hydra/launcher=slurm sweep=lr_epochs ... sweep.plan=true

Per job: the swept values, epochs, audio hours per epoch (train split), GPU-hours (training + the
periodic dev-set evaluations) and peak GPU memory, then the total; nothing is submitted. Throughput
comes from earlier MLflow runs of the same model and trainer settings (`train_audio_seconds_per_second`),
else from our H200 measurements below; the plan says which it used.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

GPU = "H200"  # the GPU our measured table is for
# Our H200 measurement (w2v-bert-2.0 shape, 606 M parameters, fixed 6 s clips): training audio seconds per
# second and peak GiB per trainer preset. Evaluation is forward only: estimated at 3x the training
# throughput of the same precision and batch without gradient checkpointing (a forward pass is about a
# third of a training step).
MEASURED = {
    ("w2v-bert-2.0", "seed"): {
        "train": 95.8,
        "eval": 3 * 191.9,
        "peak_gib": 9.5,
        "what": "fp16, gradient checkpointing, batch 4",
    },
    ("w2v-bert-2.0", "gpu_fast"): {
        "train": 900.2,
        "eval": 3 * 900.2,
        "peak_gib": 54.8,
        "what": "bf16, sdpa, batch 64 x 6 s, no checkpointing",
    },
}
# A checkpoint holds fp32 weights (4 bytes a parameter) and AdamW's two moments (8 more): ~7 GB for w2v-bert-2.0.
CHECKPOINT_BYTES_PER_PARAMETER = 12
KNOWN_PARAMETERS = {"w2v-bert-2.0": 606e6}  # models read from the Hub, whose shape the plan cannot load offline
VARIABLE_LENGTH_NOTE = (
    "our H200 measurement with variable-length batches at the seed's batch 4 reached only 21-26 audio s/s "
    "(new shapes every step): on real data the seed's settings may cost ~4x these hours"
)
# Trainer settings that decide throughput: MLflow runs count as "the same preset" when these match.
THROUGHPUT_KEYS = (
    "model.name",
    "trainer.precision",
    "trainer.batch_size",
    "trainer.batch_seconds",
    "trainer.grad_accum",
    "trainer.gradient_checkpointing",
    "trainer.attn_implementation",
)


@dataclass
class JobPlan:
    job: str
    swept: str
    epochs: float | None = None
    audio_hours: float | None = None  # train split, per epoch
    gpu_hours: float | None = None
    peak_gib: float | None = None
    source: str = ""
    data: str = ""
    error: str | None = None


# ---- data -------------------------------------------------------------------------------------
def dataset_hours(ds: DictConfig) -> tuple[float | None, float | None, float | None, str]:
    """(train hours, dev hours, train utterances, where the figures come from) of one epoch."""
    held_out = float(ds.get("dev_fraction") or 0) + float(ds.get("test_fraction") or 0)
    approx = ds.get("approx_hours")
    if ds.loader == "manifest":
        path = Path(str(None if OmegaConf.is_missing(ds, "train") else ds.get("train")))
        if not path.is_file():
            return None, None, None, f"absent: dataset.train={path} is not a file"
        seconds, rows, unknown = manifest_seconds(path)
        if unknown:
            return (
                None,
                None,
                None,
                (
                    f"UNKNOWN hours: {unknown} of {rows} utterances in {path.name} have no duration and no readable "
                    'audio header (add "duration" to the manifest)'
                ),
            )
        # carved out of train only where no file is given (asr/data: dev_fraction / test_fraction)
        dev_share = 0.0 if ds.get("dev") else float(ds.get("dev_fraction") or 0)
        share = 1 - (dev_share + (0.0 if ds.get("test") else float(ds.get("test_fraction") or 0)))
        dev_seconds = seconds * dev_share
        if ds.get("dev") and Path(str(ds.dev)).is_file():
            dev_seconds, _, _ = manifest_seconds(Path(str(ds.dev)))
        return seconds * share / 3600, dev_seconds / 3600, rows * share, f"measured from {path.name}"
    if ds.loader == "synthetic_ne":
        sizes = ds.sizes
        seconds_each = float(ds.get("approx_seconds_per_utterance") or 0)
        return (
            sizes.train * seconds_each / 3600,
            sizes.dev * seconds_each / 3600,
            sizes.train,
            "generated on first use (approximate)",
        )
    root = None if OmegaConf.is_missing(ds, "root") else ds.get("root")
    present = root is not None and Path(str(root)).is_dir()
    data = "present" if present else "absent (dataset.root not set or not found)"
    if approx is None:
        return None, None, None, data
    utterances = float(ds.get("approx_utterances") or 0) * (1 - held_out)
    return (
        float(approx) * (1 - held_out),
        float(approx) * float(ds.get("dev_fraction") or 0),
        utterances,
        f"{data}; hours: the config's approximate figure ({approx} h)",
    )


def manifest_seconds(path: Path) -> tuple[float, int, int]:
    """(audio seconds, utterances, utterances of unknown length) of a manifest: its `duration` fields,
    else the audio file's header (soundfile reads only the header)."""
    import soundfile

    seconds, rows, unknown = 0.0, 0, 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row, rows = json.loads(line), rows + 1
        if row.get("duration"):
            seconds += float(row["duration"])
            continue
        audio = Path(str(row.get("audio_filepath", "")))
        try:
            seconds += soundfile.info(str(audio if audio.is_absolute() else path.parent / audio)).duration
        except (OSError, RuntimeError):
            unknown += 1
    return seconds, rows, unknown


# ---- throughput -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _tracking(uri: str):
    """(client, experiment ids) of the tracking store, or None when it cannot be reached (asked once per plan)."""
    from mlflow.tracking import MlflowClient

    from asr.tracking import check_reachable

    try:
        if uri.startswith("http"):
            check_reachable(uri, timeout_s=3)
        client = MlflowClient(uri)
        return client, [e.experiment_id for e in client.search_experiments()]
    except Exception as err:  # noqa: BLE001  (no tracking server: fall back to the measured table)
        log.info("plan: no MLflow throughput from %s (%s)", uri, err)
        return None


def mlflow_throughput(cfg: DictConfig) -> tuple[float, float | None, int, str] | None:
    """(median audio s/s per GPU, highest peak GiB or None, runs, device) of earlier runs with the same
    throughput settings on the device most of them ran on."""
    from asr.tracking import tracking_uri

    tracking = _tracking(tracking_uri(cfg.tracking.get("uri")))
    if not tracking or not tracking[1]:
        return None
    client, experiments = tracking
    terms = [f"params.`{key}` = '{OmegaConf.select(cfg, key)}'" for key in THROUGHPUT_KEYS]  # as asr.tracking logs them
    try:
        runs = client.search_runs(
            experiments, " and ".join([*terms, "metrics.train_audio_seconds_per_second > 0"]), max_results=50
        )
    except Exception as err:  # noqa: BLE001
        log.info("plan: no MLflow throughput (%s)", err)
        return None
    if not runs:
        return None
    # one kind of device only (the most frequent one; runs from before the `device` tag count as unknown)
    devices = [r.data.tags.get("device", "unknown device") for r in runs]
    device = max(set(devices), key=devices.count)
    runs = [r for r, d in zip(runs, devices) if d == device]
    # under DDP the logged figure is all ranks' audio: the plan's GPU-hours need one GPU's
    speeds = [
        r.data.metrics["train_audio_seconds_per_second"] / max(1, r.data.metrics.get("train_world_size", 1))
        for r in runs
    ]
    peaks = [r.data.metrics["peak_gpu_memory_gib"] for r in runs if "peak_gpu_memory_gib" in r.data.metrics]
    return statistics.median(speeds), (max(peaks) if peaks else None), len(runs), device


def estimate(cfg: DictConfig, trainer_preset: str, job: str, swept: str) -> JobPlan:
    plan = JobPlan(job, swept)
    train_h, dev_h, utterances, plan.data = dataset_hours(cfg.dataset)
    plan.audio_hours = train_h
    trainer = cfg.trainer
    plan.epochs = float(trainer.epochs)
    measured = mlflow_throughput(cfg)
    if measured:
        speed, plan.peak_gib, n, device = measured
        eval_speed = 3 * speed
        plan.source = f"MLflow: {n} earlier run(s) of these settings on {device}, per GPU"
    elif (cfg.model.name, trainer_preset) in MEASURED:
        row = MEASURED[(cfg.model.name, trainer_preset)]
        speed, eval_speed, plan.peak_gib = row["train"], row["eval"], row["peak_gib"]
        plan.source = f"our {GPU} measurement ({row['what']})"
    else:
        plan.source = (
            f"no measurement for model {cfg.model.name} + trainer={trainer_preset}: run one job, then plan again"
        )
        return plan
    if train_h is None:
        return plan
    if trainer.get("batch_seconds"):
        steps_per_epoch = train_h * 3600 / trainer.batch_seconds / trainer.grad_accum
    else:
        steps_per_epoch = (utterances or 0) / (trainer.batch_size * trainer.grad_accum)
    if trainer.get("max_steps") and steps_per_epoch:
        plan.epochs = min(plan.epochs, trainer.max_steps / steps_per_epoch)
    evals = plan.epochs * steps_per_epoch / trainer.eval_steps if trainer.eval_steps else 0
    seconds = plan.epochs * train_h * 3600 / speed + evals * (dev_h or 0) * 3600 / eval_speed
    plan.gpu_hours = seconds / 3600
    return plan


# ---- jobs -------------------------------------------------------------------------------------
def compose_job(overrides: list[str]) -> DictConfig:
    """The job's config with its `hydra.runtime.choices` (which trainer preset it uses)."""
    return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def plan_jobs(jobs: list[tuple[str, list[str], list[str]]], trials: int = 1) -> list[JobPlan]:
    """jobs: (name, overrides, swept overrides). A job that does not compose gets its error instead."""
    plans = []
    for name, overrides, swept in jobs:
        try:
            cfg = compose_job(overrides)
            plans.append(estimate(cfg, cfg.hydra.runtime.choices.get("trainer"), name, " ".join(swept)))
        except Exception as err:  # noqa: BLE001  (reported in the table; the plan exits non-zero)
            plans.append(JobPlan(name, " ".join(swept), error=f"{type(err).__name__}: {err}".splitlines()[0]))
    return plans


def grid_jobs(overrides: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """What Hydra's basic sweeper would launch for `-m` with these overrides: (job number, overrides, swept)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept_keys = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    return [(str(i), job, [o for o in job if o.split("=", 1)[0] in swept_keys]) for i, job in enumerate(batches)]


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
        key = tuple(o for o in overrides if o.split("=", 1)[0] != "trainer.epochs")
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


def checkpoint_gib(cfg: DictConfig) -> float | None:
    """Disk of one full checkpoint of this job's model (weights and optimizer state)."""
    from asr.model import from_checkpoint, shape_config

    parameters = KNOWN_PARAMETERS.get(cfg.model.name)
    if parameters is None and not from_checkpoint(cfg.model):
        import torch
        from transformers import Wav2Vec2BertForCTC

        config = shape_config(cfg.model)
        config.vocab_size = config.vocab_size or 100  # the CTC head's size comes from the data: a character set
        with torch.device("meta"):  # the shape only: no memory, no weights
            parameters = sum(p.numel() for p in Wav2Vec2BertForCTC(config).parameters())
    return parameters * CHECKPOINT_BYTES_PER_PARAMETER / 2**30 if parameters else None


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
        from asr.multirun import sweep_overrides

        if "asr_optuna_sweeper" in str(config.hydra.sweeper.get("_target_", "")):
            print(
                "error: plan=true plans Hydra grids; for an Optuna study use `python sweep.py ... sweep.plan=true`",
                file=sys.stderr,
            )
            raise SystemExit(1)
        overrides = [o for o in sweep_overrides(config) if o.split("=", 1)[0] != "plan"]
        launcher = config.hydra.launcher.get("_target_", "").rsplit(".", 1)[-1]
        try:
            jobs = grid_jobs(overrides)
        except Exception as err:  # noqa: BLE001  (e.g. interval() sweeps, which only the Optuna sweeper takes)
            print(f"error: cannot list the grid's jobs: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        shared = "asr_branches_sweeper" in str(config.hydra.sweeper.get("_target_", ""))
        title = f"Plan of `train.py -m` ({launcher}): {' '.join(overrides)}"
        if shared:  # refused here exactly as the run refuses it (hydra_plugins/asr_branches_sweeper)
            check_shared_trunk(jobs)
        cooldown = config.trainer.cooldown_fraction if shared else None
        slurm = config.hydra.launcher if "Slurm" in launcher else None
        raise SystemExit(print_plan(jobs, title, cooldown=cooldown, launcher=slurm))


def study_jobs(spec) -> tuple[list[tuple[str, list[str], list[str]]], int, str]:
    """sweep.py's trials as plan rows: every grid point; for sampled studies one row per combination of the
    categorical choices, numeric parameters at their upper bound (so the total is an upper bound)."""
    import itertools

    from optuna.distributions import CategoricalDistribution

    from asr.sweep.space import to_overrides
    from asr.sweep.study import n_trials_total

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
