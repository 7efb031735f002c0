"""Training throughput in every run: audio seconds per second, padding, shapes, GPU memory, MFU.

The numbers come from the collator's host-side `batch_stats` (CTCTrainer hands them to
`BatchStats`), so measuring never synchronises with the GPU. Time counts the training steps
only: the clock restarts after every evaluation and checkpoint save.

MFU (GPU only) is an estimate: per sequence of T padded frames, 6 x parameters x T (forward +
backward of every weight) + 18 x layers x hidden x T^2 (attention scores, relative-position
scores and weighted sums): 10-20% below what torch.utils.flop_counter counts on w2v-bert shapes (tested),
divided by the GPU's dense bf16/fp16 peak (`trainer.peak_tflops`, or looked up by device name).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks, TFLOP/s (vendor data sheets, SXM parts); first match of the device name wins.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


@dataclass
class BatchStats:
    """Running totals of what the training batches held (real vs padded frames, shapes)."""

    real_frames: int = 0
    padded_frames: int = 0
    flops: float = 0.0
    shapes: set = field(default_factory=set)
    flops_per_shape: object = None  # (batch, frames) -> FLOPs of one training step on that shape

    def add(self, stats: dict) -> None:
        self.real_frames += stats["real_frames"]
        self.padded_frames += stats["padded_frames"]
        self.shapes.add(tuple(stats["shape"]))
        if self.flops_per_shape is not None:
            self.flops += self.flops_per_shape(*stats["shape"])

    def take(self) -> tuple[int, int, float]:
        """Frames and FLOPs since the last call (one optimizer step's micro-batches)."""
        out = (self.real_frames, self.padded_frames, self.flops)
        self.real_frames = self.padded_frames = 0
        self.flops = 0.0
        return out


def training_flops(model: torch.nn.Module) -> callable:
    """FLOPs of a forward + backward pass on a (batch, frames) input: 6·P·B·T + k·L·d·B·T² (see module doc).

    k = 12 for the attention scores and weighted sums, 18 with w2v-bert's relative-position
    scores (`relative_key`: one more T x T x d product per layer).
    """
    params = sum(p.numel() for p in model.parameters())
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    k = 18.0 if getattr(model.config, "position_embeddings_type", None) == "relative_key" else 12.0
    return lambda batch, frames: 6.0 * params * batch * frames + k * layers * hidden * batch * frames**2


def device_name() -> str:
    """The accelerator training runs on, as plan=true matches throughput by it: the GPU's name, or cpu."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_flops(peak_tflops: float | None) -> float | None:
    if peak_tflops:
        return peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


class ThroughputCallback(TrainerCallback):
    """Logs `train_audio_seconds_per_second`, `train_padding_fraction`, shapes, memory and MFU.

    At every logging step (MLflow curves, through `tracker`) and once at the end (`self.summary`,
    which asr/pipeline.py puts into metrics.json). Under DDP the end totals are summed over ranks.
    """

    def __init__(
        self, stats: BatchStats, tracker=None, frames_per_second: float = 50.0, peak_tflops: float | None = None
    ) -> None:
        self.stats, self.tracker, self.fps = stats, tracker, frames_per_second
        self.peak = peak_flops(peak_tflops)
        self.summary: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.peak:
            self.stats.flops_per_shape = training_flops(model)
        self.stats.take()
        self.real = self.padded = 0
        self.flops = self.seconds = 0.0
        self.epoch_shapes: list[int] = []
        self.stats.shapes.clear()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._clock = time.perf_counter()

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.stats.shapes:
            self.epoch_shapes.append(len(self.stats.shapes))
        self.stats.shapes.clear()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        real, padded, flops = self.stats.take()
        self.real, self.padded, self.flops = self.real + real, self.padded + padded, self.flops + flops
        self.seconds += now - self._clock
        self._clock = now

    def _restart_clock(self, *args, **kwargs):  # evaluation and checkpointing are not training time
        self._clock = time.perf_counter()

    on_evaluate = on_save = _restart_clock

    def metrics(
        self, real: float, padded: float, flops: float, seconds: float, world_size: int = 1
    ) -> dict[str, float]:
        out = {
            "train_audio_seconds_per_second": real / self.fps / seconds if seconds else 0.0,
            "train_padding_fraction": 1 - real / padded if padded else 0.0,
            "train_distinct_shapes": max([*self.epoch_shapes, len(self.stats.shapes)]),
        }
        if torch.cuda.is_available():
            out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            if self.peak and seconds:
                out["train_mfu"] = flops / seconds / (self.peak * world_size)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.tracker is not None and logs and "loss" in logs and self.seconds:
            # rank 0's own batches, scaled by the number of ranks: an estimate; the end summary is exact
            world = args.world_size
            self.tracker.log_metrics(
                self.metrics(self.real * world, self.padded * world, self.flops * world, self.seconds, world),
                step=state.global_step,
            )

    def on_train_end(self, args, state, control, **kwargs):
        totals = torch.tensor([self.real, self.padded, self.flops], dtype=torch.float64)
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            device = args.device if torch.distributed.get_backend() == "nccl" else "cpu"
            totals = totals.to(device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        real, padded, flops = totals.tolist()
        self.summary = {
            **self.metrics(real, padded, flops, self.seconds, args.world_size),
            "train_timed_seconds": self.seconds,
            "train_real_audio_seconds": real / self.fps,
            "train_padded_audio_seconds": padded / self.fps,
            "train_world_size": args.world_size,  # audio s/s above is all ranks': per GPU, divide by this
        }
        if state.is_world_process_zero and self.tracker is not None:
            self.tracker.log_metrics(self.summary, step=state.global_step)
        log.info(
            "throughput: %.1f audio s/s, padding %.1f%%, %d distinct shapes per epoch",
            self.summary["train_audio_seconds_per_second"],
            100 * self.summary["train_padding_fraction"],
            self.summary["train_distinct_shapes"],
        )
