"""What one job will cost before it runs: audio hours of its data, throughput (from earlier MLflow runs of
the same settings, else our H200 measurements), GPU-hours, peak memory and checkpoint size. asr.plan
prints these for a grid or a study.
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from hydra import compose
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
    if trainer.batch_seconds:
        steps_per_epoch = train_h * 3600 / trainer.batch_seconds / trainer.grad_accum
    else:
        steps_per_epoch = (utterances or 0) / (trainer.batch_size * trainer.grad_accum)
    if trainer.max_steps and steps_per_epoch:
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
