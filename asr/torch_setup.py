"""How torch runs for a trainer preset: precision, the process-wide GPU settings (TF32, cuDNN autotuning,
the CUDA allocator), DDP on CPU, and the CPU thread governor (asr.threads measures, it acts)."""

from __future__ import annotations

import logging
import os
import time

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from asr.errors import ConfigError
from asr.threads import CpuShare, threads_for, usable_cores

log = logging.getLogger(__name__)


def resolve_precision(precision: str) -> dict[str, bool]:
    """auto = bf16 where the GPU supports it, else fp16 on CUDA, fp32 on CPU."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision in ("fp16", "bf16") and not cuda:
        log.warning("trainer.precision=%s needs a CUDA GPU; training in fp32 on this machine", precision)
        precision = "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(
            f"trainer.precision={precision!r} is not a precision. Fix: trainer.precision=auto, fp32, fp16 or bf16"
        )
    return {"fp16": precision == "fp16", "bf16": precision == "bf16"}


def _on_cuda(setting: bool, name: str) -> bool:
    if setting and not torch.cuda.is_available():
        log.info("trainer.%s applies to CUDA GPUs only; ignored on this machine", name)
    return bool(setting) and torch.cuda.is_available()


def configure_torch(cfg: DictConfig) -> None:
    """Process-wide GPU settings of the trainer preset (no-ops on CPU); see conf/trainer/gpu_fast.yaml."""
    if cfg.cuda_alloc_conf:
        # read by the CUDA caching allocator when it starts: set before anything touches the GPU
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", cfg.cuda_alloc_conf)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.memory._set_allocator_settings(cfg.cuda_alloc_conf)
    if _on_cuda(cfg.tf32, "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    benchmark = cfg.cudnn_benchmark
    if benchmark == "auto":  # autotuning pays off only when the same few shapes come back
        benchmark = bool(cfg.bucket_edges_seconds) or (cfg.pad_to_multiple_of or 1) > 1
    if _on_cuda(benchmark, "cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True


def ddp_on_cpu() -> bool:
    """torchrun on a machine without CUDA: accelerate needs cpu=True to use gloo (else each rank trains alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


class ThreadGovernor(TrainerCallback):
    """`trainer.cpu_threads=adaptive` on CPU: every `interval_s` seconds of training, torch gets the
    cores other processes left free (asr.threads), so a busy neighbour slows training down instead
    of stalling every OpenMP barrier; all cores come back when the neighbour is gone."""

    def __init__(self, interval_s: float) -> None:
        self.cores, self.interval_s = usable_cores(), interval_s
        self.share, self.next_look = None, 0.0
        self.initial = self.threads = torch.get_num_threads()

    def on_train_begin(self, args, state, control, **kwargs):
        self.share, self.next_look = CpuShare(), time.monotonic() + self.interval_s

    def on_step_end(self, args, state, control, **kwargs):
        if self.share is None or time.monotonic() < self.next_look:
            return
        self.next_look = time.monotonic() + self.interval_s
        others = self.share.others()
        if others is None:
            return
        threads = threads_for(self.cores, others)
        if threads != self.threads:
            log.info(
                "CPU threads %d → %d (other processes use %.1f of %d cores)", self.threads, threads, others, self.cores
            )
            torch.set_num_threads(threads)
            self.threads = threads

    def on_train_end(self, args, state, control, **kwargs):
        torch.set_num_threads(self.initial)  # the test evaluation after training starts from every thread again


def thread_callbacks(cfg: DictConfig) -> list[TrainerCallback]:
    """trainer.cpu_threads: adaptive (the governor, on CPU without a fixed OMP_NUM_THREADS) | all."""
    mode = cfg.cpu_threads
    if mode not in ("adaptive", "all"):
        raise ConfigError(
            f"trainer.cpu_threads={mode!r} is not a thread policy. Fix: trainer.cpu_threads=adaptive or all"
        )
    fixed = "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available()
    return [ThreadGovernor(cfg.cpu_threads_check_s)] if mode == "adaptive" and not fixed else []
