"""Checkpoint averaging (`trainer.average_checkpoints=N`): the element-wise mean of the weights of N
saved checkpoints of a run, tested beside the run's own model, as ESPnet's `average_nbest_models`.

Which N (`trainer.average_checkpoints_by`): `last`, the newest N saved; `best`, the N with the lowest
dev WER among those still on disk; `cooldown` (lr_scheduler=wsd), N checkpoints saved evenly through
the run's final decay, the last at its final step (`CooldownSaves` asks the Trainer for those saves,
whatever `save_steps` says), so the average never mixes in weights from the constant-rate phase.
Only the run's own checkpoint folder is read, so a branch of a shared trunk averages within its own
cooldown. The average needs the N checkpoints on disk at the end of training:
`trainer.save_total_limit` must keep them (checked before training).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from asr.branches import checkpoint_step, decay_steps, fork_step
from asr.errors import ConfigError
from asr.requeue import is_complete

WEIGHTS = "model.safetensors"
CHOICES = ("last", "best", "cooldown")


def check_settings(trainer: DictConfig) -> None:
    """A setting that cannot give N checkpoints to average is a one-line error before training."""
    n, by = trainer.average_checkpoints, trainer.average_checkpoints_by
    if n < 0 or n == 1:
        raise ConfigError(
            f"trainer.average_checkpoints={n}: averaging needs 2 or more checkpoints. Fix: 0 (off) or N >= 2"
        )
    if by not in CHOICES:
        raise ConfigError(f"trainer.average_checkpoints_by={by!r}. Fix: one of {', '.join(CHOICES)}")
    if n and by == "cooldown" and trainer.lr_scheduler != "wsd":
        raise ConfigError(
            f"trainer.average_checkpoints_by=cooldown averages within a WSD decay, but trainer.lr_scheduler="
            f"{trainer.lr_scheduler}. Fix: trainer.lr_scheduler=wsd, or trainer.average_checkpoints_by=last"
        )
    if n and trainer.save_total_limit is not None and trainer.save_total_limit < n:
        raise ConfigError(
            f"trainer.average_checkpoints={n} needs {n} checkpoints on disk, but trainer.save_total_limit="
            f"{trainer.save_total_limit} deletes older ones. Fix: trainer.save_total_limit={n} (or null)"
        )


def callbacks(trainer: DictConfig) -> list[TrainerCallback]:
    """What a run that averages needs from the Trainer: by=cooldown, the saves inside the decay."""
    if trainer.average_checkpoints and trainer.average_checkpoints_by == "cooldown":
        return [CooldownSaves(trainer.average_checkpoints, trainer.cooldown_fraction)]
    return []


def cooldown_steps(max_steps: int, n: int, cooldown_fraction: float) -> list[int]:
    """by=cooldown: the steps, evenly through the decay of a WSD run of `max_steps`, whose checkpoints are
    averaged; the last is the final step (fewer than n when the decay has fewer than n steps)."""
    start, decay = fork_step(max_steps, cooldown_fraction), decay_steps(max_steps, cooldown_fraction)
    return sorted({start + max(1, round(decay * k / n)) for k in range(1, n + 1)})


class CooldownSaves(TrainerCallback):
    """Saves a checkpoint at each of `cooldown_steps` (besides the Trainer's every-save_steps ones)."""

    def __init__(self, n: int, cooldown_fraction: float) -> None:
        self.n, self.cooldown_fraction, self.steps = n, cooldown_fraction, set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = set(cooldown_steps(state.max_steps, self.n, self.cooldown_fraction))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


def choose(folder: Path, n: int, by: str, log_history: list[dict], decay_from: int = 0) -> list[Path]:
    """The checkpoints to average, oldest first: the newest n complete ones, the n with the lowest dev WER,
    or (by=cooldown) the newest n saved after step `decay_from`, the last at the constant rate (the fork)."""
    saved = sorted(
        (c for c in Path(folder).glob("checkpoint-*") if c.name.rsplit("-", 1)[-1].isdigit() and is_complete(c)),
        key=checkpoint_step,
    )
    if by == "cooldown":
        saved = [c for c in saved if checkpoint_step(c) > decay_from]
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
