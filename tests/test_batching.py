"""Duration-bucketed batches and bounded padded shapes: every utterance once, caps, determinism, DDP ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from asr.batching import DurationBatchSampler, PadPolicy, batch_cost, padding_stats
from asr.collator import STATS_KEY, CTCCollator
from asr.features import build_processor, build_vocab
from asr.inference import blank_padded_frames
from asr.model import build_model, load_feature_extractor
from asr.trainer import CTCTrainer

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`

POLICIES = [PadPolicy(), PadPolicy(multiple_of=25), PadPolicy(multiple_of=25, edges=(100, 150, 200, 300))]


def _lengths(n: int = 500, seed: int = 0) -> np.ndarray:
    """Frames (50/s) of a log-normal draw around 4 s, plus a few utterances longer than any cap used below."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(4.0), 0.45, n), 0.5, 15) * 50
    lengths[:3] = [1400, 1250, 1000]
    return lengths.astype(int)


@pytest.mark.parametrize("pad", POLICIES)
@pytest.mark.parametrize("max_frames", [600, 1200, 3000])
def test_every_utterance_exactly_once_and_the_cap_holds(pad, max_frames):
    lengths = _lengths()
    sampler = DurationBatchSampler(lengths, max_frames, pad, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert Counter(i for b in batches for i in b) == Counter(range(len(lengths)))
        for batch in batches:
            cost = batch_cost(lengths, batch, pad)
            assert cost <= max_frames or (len(batch) == 1 and pad.padded(lengths[batch[0]]) > max_frames)
    over_long = [b for b in batches if batch_cost(lengths, b, pad) > max_frames]
    assert all(len(b) == 1 for b in over_long)
    assert len(over_long) == int(sum(pad.padded(n) > max_frames for n in lengths))


def test_bucketing_keeps_padding_small_and_batches_full():
    lengths = _lengths(2000)
    batches = list(DurationBatchSampler(lengths, 3000, seed=0))
    stats = padding_stats(lengths, batches)
    assert stats["padding_fraction"] < 0.02  # sorted by length: neighbours differ by a frame or two
    # batches use the budget: mean padded size within 10% of the cap (the single over-long ones aside)
    sizes = [batch_cost(lengths, b, PadPolicy()) for b in batches if len(b) > 1]
    assert np.mean(sizes) > 0.9 * 3000
    # random batches of the same mean size waste far more
    rng = np.random.default_rng(0)
    mean_size = round(len(lengths) / len(batches))
    order = rng.permutation(len(lengths))
    random = padding_stats(lengths, [order[i : i + mean_size] for i in range(0, len(order), mean_size)])
    assert random["padding_fraction"] > 5 * stats["padding_fraction"]


def test_order_is_deterministic_given_seed_and_epoch_and_changes_across_epochs():
    lengths = _lengths()
    a, b, c = (DurationBatchSampler(lengths, 1200, PadPolicy(25), seed=s) for s in (7, 7, 8))
    for s in (a, b, c):
        s.set_epoch(1)
    assert list(a) == list(b)
    assert list(a) != list(c)
    first = list(a)
    a.set_epoch(2)
    assert list(a) != first
    a.set_epoch(1)
    assert list(a) == first
    # shuffled across buckets: the first 10 batches are not simply the 10 shortest ones
    mean_length = [np.mean(lengths[x]) for x in first]
    assert mean_length != sorted(mean_length)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_ranks_get_distinct_batches_of_equal_count(world):
    lengths = _lengths(301)
    samplers = [
        DurationBatchSampler(lengths, 1200, PadPolicy(25), seed=1, num_replicas=world, rank=r) for r in range(world)
    ]
    single = DurationBatchSampler(lengths, 1200, PadPolicy(25), seed=1)
    for epoch in range(2):
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            per_rank.append(list(s))
        assert len({len(batches) for batch_list in [per_rank] for batches in batch_list}) == 1
        assert all(len(batches) == len(s) for batches, s in zip(per_rank, samplers))
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert seen == Counter(range(len(lengths)))  # no utterance dropped or repeated to even out the ranks
        assert sum(len(b) for b in per_rank) >= len(single)  # batches were split, not merged
    # ranks at the same step get neighbouring (similar-length) batches: little waiting at the all-reduce
    steps = list(zip(*per_rank))
    spread = [max(np.mean(lengths[b]) for b in step) / min(np.mean(lengths[b]) for b in step) for step in steps]
    assert np.median(spread) < 1.1


def test_too_few_utterances_for_the_ranks_is_refused():
    with pytest.raises(ValueError, match="cannot be spread over 4"):
        DurationBatchSampler([100, 200, 300], 1000, num_replicas=4, rank=0)


def test_pad_policy_bounds_the_padded_lengths():
    policy = PadPolicy.from_seconds(25, [2, 3, 4], frames_per_second=50)
    assert policy.edges == (100, 150, 200)
    assert [policy.padded(n) for n in (1, 100, 101, 150, 199, 201, 226)] == [100, 100, 150, 150, 200, 225, 250]
    assert PadPolicy().padded(123) == 123 and not PadPolicy().bounded
    lengths = _lengths(2000)
    bounded = padding_stats(lengths, list(DurationBatchSampler(lengths, 3000, PadPolicy(25), seed=0)), PadPolicy(25))
    free = padding_stats(lengths, list(DurationBatchSampler(lengths, 3000, seed=0)))
    assert bounded["distinct_lengths"] <= 750 // 25 + 3  # up to 15 s in 0.5 s steps, plus the over-long ones
    assert free["distinct_lengths"] > 3 * bounded["distinct_lengths"]
    assert bounded["padding_fraction"] < 0.08


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = compose_cfg()
    processor = build_processor(
        build_vocab(["क ख ग घ"]), load_feature_extractor(cfg.model), tmp_path_factory.mktemp("proc")
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.regularization, processor.tokenizer)
    return processor, model


def test_collator_pads_to_bucket_lengths_and_masks_only_real_frames(tiny):
    processor, model = tiny
    rng = np.random.default_rng(0)
    rows = [{"input_features": rng.standard_normal((n, 160)).astype(np.float32), "labels": [1, 2]} for n in (37, 61)]
    batch = CTCCollator(processor, PadPolicy(multiple_of=25), with_stats=True)(rows)
    assert batch["input_features"].shape == (2, 75, 160)
    assert batch["attention_mask"].sum(-1).tolist() == [37, 61]
    assert batch["input_features"][0, 37:].abs().sum() == 0
    assert batch[STATS_KEY] == {"real_frames": 98, "padded_frames": 150, "shape": (2, 75)}
    # the extra padding changes nothing: the same greedy transcript as the utterance alone
    model.eval()
    with torch.no_grad():
        alone = CTCCollator(processor)([rows[0]])
        short = blank_padded_frames(model(**alone).logits, alone["attention_mask"], model)
        padded = blank_padded_frames(
            model(input_features=batch["input_features"], attention_mask=batch["attention_mask"]).logits,
            batch["attention_mask"],
            model,
        )
    n = short.shape[1]
    assert torch.allclose(short[0], padded[0, :n], atol=1e-4)
    assert (padded[0, n:].argmax(-1) == model.config.pad_token_id).all()


class _Record(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_trainer_sees_every_utterance_once_per_epoch_under_grad_accumulation(tiny, tmp_path):
    """Through the real CTCTrainer: batches by seconds, grad_accum 3, 2 epochs; eval and predict order."""
    processor, model = tiny
    lengths = _lengths(61, seed=2)[3:] // 4  # short utterances: fast on CPU
    rows = {
        "input_features": [np.full((n, 160), i, np.float32) for i, n in enumerate(lengths)],
        "labels": [[1 + i % 4, 2] for i in range(len(lengths))],
        "input_length": lengths.tolist(),
    }
    data = Dataset.from_dict(rows)
    seen: list[int] = []
    collate = CTCCollator(processor, PadPolicy(multiple_of=10), with_stats=True)

    def recording_collator(batch_rows):
        seen.extend(int(r["input_features"][0][0]) for r in batch_rows)
        return collate(batch_rows)

    args = TrainingArguments(
        str(tmp_path),
        num_train_epochs=2,
        gradient_accumulation_steps=3,
        learning_rate=1e-4,
        per_device_eval_batch_size=4,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        use_cpu=True,
        seed=5,
    )
    record = _Record()
    trainer = CTCTrainer(
        model=model,
        args=args,
        data_collator=recording_collator,
        train_dataset=data,
        eval_dataset=data,
        callbacks=[record],
        batch_seconds=4.0,
        pad=PadPolicy(multiple_of=10),
    )
    batches_per_epoch = len(trainer.get_train_dataloader())
    assert batches_per_epoch == len(trainer.train_batch_sampler(data)) > 6
    trainer.train()
    assert Counter(seen) == Counter({i: 2 for i in range(len(lengths))})
    assert record.steps == trainer.state.global_step == 2 * -(-batches_per_epoch // 3)

    seen.clear()
    output = trainer.predict(data)
    assert sorted(seen) == list(range(len(lengths)))
    assert seen[0] == int(np.argmax(lengths))  # evaluation batches: longest first
    label_rows = [[int(t) for t in row if t != -100] for row in output.label_ids]
    assert label_rows == rows["labels"]  # predict hands rows back in the dataset's order
