"""One w2v-bert-2.0 attention layer's relative_key bias on CPU: transformers' einsum path (an L x L x D
tensor of embeddings per layer) against asr.attention's gather path (q . E^T, then picked by distance).

    .venv/bin/python benchmarks/relative_key_bias.py [--lengths 100 250 500 750] [--rounds 5]

For each length L (frames at 50/s: 2-15 s of audio) both arms compute the bias of one layer at
w2v-bert width (16 heads x 64, 73 distances) and its backward, alternating arm order per round in
one process; it prints the median seconds of each and their ratio, and the size of the largest
intermediate each arm allocates (the einsum's L x L x 64 embedding tensor and its gradient vs the
gather's B x H x L x 73 scores). Both arms' bias is checked equal first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from asr.attention import _TRANSFORMERS_BIAS, gathered_relative_key_bias


class Layer(torch.nn.Module):
    """The attributes the bias functions read from a Wav2Vec2BertSelfAttention (w2v-bert-2.0's values)."""

    def __init__(self, head_size: int = 64, left: int = 64, right: int = 8) -> None:
        super().__init__()
        self.left_max_position_embeddings, self.right_max_position_embeddings = left, right
        self.distance_embedding = torch.nn.Embedding(left + right + 1, head_size)
        self.scaling = head_size**-0.5


def timed(fn, layer: Layer, query: torch.Tensor) -> float:
    query = query.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    _, bias = fn(layer, query, query)
    bias.sum().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 250, 500, 750])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    opts = parser.parse_args()
    torch.manual_seed(0)
    layer = Layer()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {opts.batch}, {opts.heads} heads x 64"
    )
    print("frames  einsum s  gather s  gather/einsum  einsum's L x L x 64 (+grad)  gather's B x H x L x 73")
    for length in opts.lengths:
        query = torch.randn(opts.batch, opts.heads, length, 64)
        torch.testing.assert_close(
            gathered_relative_key_bias(layer, query, query)[1], _TRANSFORMERS_BIAS(layer, query, query)[1]
        )
        times = {"einsum": [], "gather": []}
        arms = {"einsum": _TRANSFORMERS_BIAS, "gather": gathered_relative_key_bias}
        for round_ in range(opts.rounds + 1):
            order = ("einsum", "gather") if round_ % 2 else ("gather", "einsum")
            for arm in order:
                seconds = timed(arms[arm], layer, query)
                if round_:  # the first round warms both up
                    times[arm].append(seconds)
        einsum, gather = statistics.median(times["einsum"]), statistics.median(times["gather"])
        big = 2 * length * length * 64 * 4 / 2**20
        small = opts.batch * opts.heads * length * 73 * 4 / 2**20
        print(f"{length:6d}  {einsum:8.4f}  {gather:8.4f}  {gather / einsum:13.3f}  {big:20.1f} MiB  {small:17.1f} MiB")


if __name__ == "__main__":
    main()
