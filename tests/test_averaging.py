"""Checkpoint averaging: which checkpoints, and their mean equals a hand average of the tensors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_cfg
from safetensors.torch import save_file

from asr.averaging import CooldownSaves, average_weights, check_settings, choose, cooldown_steps
from asr.errors import ConfigError

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`


def _checkpoint(folder, step: int, seed: int, complete: bool = True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {
            "encoder.weight": torch.randn(4, 3, generator=generator),
            "head.bias": torch.randn(5, generator=generator).to(torch.float16),
            "position_ids": torch.arange(6) + step,  # an integer buffer: not averaged
        },
        str(path / "model.safetensors"),
    )
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_the_average_equals_a_hand_average_of_the_checkpoints_tensors(tmp_path):
    paths = [_checkpoint(tmp_path, step, seed) for step, seed in ((10, 1), (20, 2), (30, 3))]
    averaged = average_weights(paths)
    from safetensors.torch import load_file

    tensors = [load_file(str(p / "model.safetensors")) for p in paths]
    hand = (tensors[0]["encoder.weight"] + tensors[1]["encoder.weight"] + tensors[2]["encoder.weight"]) / 3
    assert torch.allclose(averaged["encoder.weight"], hand, atol=1e-6)
    half = sum(t["head.bias"].double() for t in tensors) / 3
    assert averaged["head.bias"].dtype == torch.float16 and torch.equal(averaged["head.bias"], half.half())
    assert torch.equal(averaged["position_ids"], tensors[-1]["position_ids"])  # the newest checkpoint's


def test_last_takes_the_newest_complete_checkpoints_and_best_the_lowest_dev_wer(tmp_path):
    for step, seed in ((100, 1), (200, 2), (300, 3)):
        _checkpoint(tmp_path, step, seed)
    _checkpoint(tmp_path, 400, 4, complete=False)  # a save cut short: never averaged
    history = [{"step": 100, "eval_wer": 0.3}, {"step": 200, "eval_wer": 0.5}, {"step": 300, "eval_wer": 0.4}]
    assert [p.name for p in choose(tmp_path, 2, "last", history)] == ["checkpoint-200", "checkpoint-300"]
    assert [p.name for p in choose(tmp_path, 2, "best", history)] == ["checkpoint-100", "checkpoint-300"]
    # by=cooldown: only checkpoints after the decay's start, however few
    assert [p.name for p in choose(tmp_path, 2, "cooldown", history, decay_from=200)] == ["checkpoint-300"]
    assert [p.name for p in choose(tmp_path, 3, "cooldown", history, decay_from=100)] == [
        "checkpoint-200",
        "checkpoint-300",
    ]


def test_cooldown_saves_come_evenly_through_the_decay_and_the_last_at_the_final_step():
    """A WSD run of 100 steps with cooldown_fraction 0.2 decays over steps 81..100."""
    from transformers import TrainerControl, TrainerState

    assert cooldown_steps(100, 3, 0.2) == [87, 93, 100]
    assert cooldown_steps(100, 1, 0.2) == [100]
    assert cooldown_steps(10, 4, 0.2) == [9, 10]  # a 2-step decay holds 2 checkpoints, not 4
    saves, state, control = CooldownSaves(3, 0.2), TrainerState(max_steps=100), TrainerControl()
    saves.on_train_begin(None, state, control)
    asked = []
    for step in range(1, 101):
        state.global_step, control.should_save = step, False
        saves.on_step_end(None, state, control)
        asked += [step] if control.should_save else []
    assert asked == [87, 93, 100]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["trainer.average_checkpoints=3"], "trainer.save_total_limit=3 (or null)"),
        (["trainer.average_checkpoints=1"], "needs 2 or more checkpoints"),
        (["trainer.average_checkpoints=2", "trainer.average_checkpoints_by=worst"], "one of last, best, cooldown"),
        (
            ["trainer.average_checkpoints=2", "trainer.average_checkpoints_by=cooldown", "trainer.lr_scheduler=cosine"],
            "Fix: trainer.lr_scheduler=wsd",
        ),
    ],
)
def test_settings_that_cannot_average_are_refused_before_training(overrides, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        check_settings(compose_cfg(*overrides).trainer)
    check_settings(compose_cfg("trainer.average_checkpoints=3", "trainer.save_total_limit=null").trainer)
