"""Batches sized by padded audio seconds, drawn from buckets of similar length.

Lengths are feature frames (the `input_length` column the feature extraction stores: 50 per
second for w2v-bert's features), so no audio is ever decoded here. Two pieces:

- `PadPolicy`: which padded lengths a batch may take. Padding each batch up to one of a few
  bucket lengths (explicit edges and/or a multiple of N frames) bounds the number of distinct
  tensor shapes an epoch produces: on a GPU every new shape costs allocator and kernel-selection
  work (see DESIGN.md, "Performance facts"). The collator pads with the same policy.
- `DurationBatchSampler`: per epoch, every index exactly once; batches whose *padded* size
  (utterances x padded length) stays within `max_frames` (a single utterance longer than that
  gets a batch of its own); batch order shuffled, deterministic given seed + epoch. Under DDP it
  is rank-aware: all ranks build the same global list, which is made a multiple of the world
  size by splitting batches (never by dropping or repeating utterances), and rank r takes the
  r-th batch of each group. Groups hold neighbouring batches of similar length, so ranks wait
  little on each other at the gradient all-reduce.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler


@dataclass(frozen=True)
class PadPolicy:
    """Padded length (frames) for a batch whose longest utterance has `n` frames.

    `edges`: ascending bucket lengths in frames; a batch pads to the first edge >= n. Beyond the
    last edge (or with no edges), `multiple_of` rounds n up (None/1 = pad to the longest, as before).
    """

    multiple_of: int | None = None
    edges: tuple[int, ...] = ()

    @classmethod
    def from_seconds(
        cls, multiple_of_frames: int | None, edges_seconds: Sequence[float] | None, frames_per_second: float
    ) -> PadPolicy:
        edges = tuple(sorted({int(math.ceil(s * frames_per_second)) for s in (edges_seconds or ())}))
        return cls(multiple_of_frames if multiple_of_frames and multiple_of_frames > 1 else None, edges)

    @property
    def bounded(self) -> bool:
        return bool(self.edges) or self.multiple_of is not None

    def padded(self, n: int) -> int:
        if self.edges and n <= self.edges[-1]:
            return self.edges[bisect.bisect_left(self.edges, n)]
        if self.multiple_of:
            return -(-n // self.multiple_of) * self.multiple_of
        return n


def batch_cost(lengths: np.ndarray, batch: Sequence[int], pad: PadPolicy) -> int:
    """Padded frames of a batch: utterances x padded length."""
    return len(batch) * pad.padded(int(lengths[list(batch)].max()))


def padding_stats(
    lengths: Sequence[int], batches: Sequence[Sequence[int]], pad: PadPolicy = PadPolicy()
) -> dict[str, float]:
    """Real vs padded frames over batches, and how many distinct (batch, frames) shapes they make."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[list(b)].sum()) for b in batches)
    padded = sum(batch_cost(lengths, b, pad) for b in batches)
    shapes = {(len(b), pad.padded(int(lengths[list(b)].max()))) for b in batches}
    return {
        "real_frames": real,
        "padded_frames": padded,
        "padding_fraction": 1 - real / padded if padded else 0.0,
        "padding_waste": padded / real - 1 if real else 0.0,
        "distinct_shapes": len(shapes),
        "distinct_lengths": len({s[1] for s in shapes}),
        "batches": len(batches),
    }


class DurationBatchSampler(Sampler[list[int]]):
    """Batches of at most `max_frames` padded frames (see the module docstring).

    `shuffle=False` gives evaluation order: longest batches first, no randomness.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_frames: int,
        pad: PadPolicy = PadPolicy(),
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_frames, self.pad, self.seed, self.shuffle = int(max_frames), pad, seed, shuffle
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        if len(self.lengths) < num_replicas:
            raise ValueError(f"{len(self.lengths)} utterances cannot be spread over {num_replicas} processes")
        self._num_batches = len(self._rank_batches(0))  # the same every epoch: batch boundaries depend on lengths only

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of each epoch: a new, reproducible batch order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._rank_batches(self.epoch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of one epoch, in the order they are consumed (rank 0's first of each step)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = self._split_to_multiple(self._length_batches(rng))
        groups = [batches[i : i + self.num_replicas] for i in range(0, len(batches), self.num_replicas)]
        if self.shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        return [batch for group in groups for batch in group]

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        return self.global_batches(epoch)[self.rank :: self.num_replicas]

    def _length_batches(self, rng: np.random.Generator) -> list[list[int]]:
        """Indices sorted by padded length (random order among equals), cut greedily under the cap."""
        keys = np.fromiter((self.pad.padded(int(n)) for n in self.lengths), np.int64, len(self.lengths))
        tiebreak = rng.permutation(len(keys)) if self.shuffle else np.arange(len(keys))
        order = np.lexsort((tiebreak, self.lengths, keys))  # ascending: padded length, then length
        if not self.shuffle:
            order = order[::-1]  # evaluation: longest first, so memory problems show at once
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index in order.tolist():
            n = int(keys[index])
            grown = max(longest, n)
            if current and (len(current) + 1) * grown > self.max_frames:
                batches.append(current)
                current, grown = [], n
            current.append(index)
            longest = grown
        if current:
            batches.append(current)
        return batches

    def _split_to_multiple(self, batches: list[list[int]]) -> list[list[int]]:
        """Split the largest batches until every rank gets as many (never drop or repeat an utterance)."""
        while len(batches) % self.num_replicas:
            largest = max(range(len(batches)), key=lambda i: (len(batches[i]), -i))
            batch = batches[largest]
            if len(batch) < 2:  # cannot happen: there are at least num_replicas utterances
                raise RuntimeError("cannot split single-utterance batches further")
            half = len(batch) // 2
            batches[largest : largest + 1] = [batch[:half], batch[half:]]
        return batches


def cap_for_mean_batch(lengths: Sequence[int], batch_size: float, pad: PadPolicy = PadPolicy()) -> int:
    """The padded-frames cap whose batches hold `batch_size` utterances on average (bisection): what
    batch_seconds (= cap / 50) gives the same mean batch as a fixed batch size on these lengths."""
    lengths = np.asarray(lengths)
    low, high = int(lengths.max()), int(lengths.max()) * int(batch_size) * 4
    while high - low > 1:
        mid = (low + high) // 2
        mean = len(lengths) / len(DurationBatchSampler(lengths, mid, pad))
        low, high = (mid, high) if mean < batch_size else (low, mid)
    return high
