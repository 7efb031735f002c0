"""Checkpoint averaging (`trainer.average_checkpoints=N`): the element-wise mean of the weights of N
saved checkpoints of a run, tested beside the run's own model, as ESPnet's `average_nbest_models`.

Which N (`trainer.average_checkpoints_by`): `last`, the newest N saved; `best`, the N with the lowest
dev WER among those still on disk. Only the run's own checkpoint folder is read, so a branch of a
shared trunk averages within its cooldown. The average needs the N checkpoints on disk at the end of
training: `trainer.save_total_limit` must keep them (checked before training).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from asr.branches import checkpoint_step
from asr.errors import ConfigError
from asr.requeue import is_complete

WEIGHTS = "model.safetensors"
CHOICES = ("last", "best")


def check_settings(trainer: DictConfig) -> None:
    """A setting that cannot give N checkpoints to average is a one-line error before training."""
    n, by = trainer.average_checkpoints, trainer.average_checkpoints_by
    if n < 0 or n == 1:
        raise ConfigError(
            f"trainer.average_checkpoints={n}: averaging needs 2 or more checkpoints. Fix: 0 (off) or N >= 2"
        )
    if by not in CHOICES:
        raise ConfigError(f"trainer.average_checkpoints_by={by!r}. Fix: one of {', '.join(CHOICES)}")
    if n and trainer.save_total_limit is not None and trainer.save_total_limit < n:
        raise ConfigError(
            f"trainer.average_checkpoints={n} needs {n} checkpoints on disk, but trainer.save_total_limit="
            f"{trainer.save_total_limit} deletes older ones. Fix: trainer.save_total_limit={n} (or null)"
        )


def choose(folder: Path, n: int, by: str, log_history: list[dict]) -> list[Path]:
    """The checkpoints to average, oldest first: the newest n complete ones, or the n with the lowest dev WER."""
    saved = sorted(
        (c for c in Path(folder).glob("checkpoint-*") if c.name.rsplit("-", 1)[-1].isdigit() and is_complete(c)),
        key=checkpoint_step,
    )
    if by == "best":
        wer = {entry["step"]: entry["eval_wer"] for entry in log_history if "eval_wer" in entry}
        ranked = sorted(
            (c for c in saved if checkpoint_step(c) in wer),
            key=lambda c: (wer[checkpoint_step(c)], -checkpoint_step(c)),
        )
        return sorted(ranked[:n], key=checkpoint_step)
    return saved[-n:]


def average_weights(checkpoints: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the checkpoints' floating-point tensors (accumulated in float64, returned
    in each tensor's own dtype); integer buffers are taken from the newest checkpoint."""
    if not checkpoints:
        raise ValueError("no checkpoint to average")
    total: dict[str, torch.Tensor] = {}
    newest: dict[str, torch.Tensor] = {}
    for path in checkpoints:
        weights = load_file(str(Path(path) / WEIGHTS), device="cpu")
        for name, tensor in weights.items():
            newest[name] = tensor
            if tensor.is_floating_point():
                total[name] = total.get(name, 0) + tensor.to(torch.float64)
    return {
        name: (total[name] / len(checkpoints)).to(tensor.dtype) if name in total else tensor
        for name, tensor in newest.items()
    }
