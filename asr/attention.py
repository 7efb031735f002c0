"""Wav2Vec2-BERT's `relative_key` attention bias without its L x L x D tensor.

w2v-bert-2.0 biases every attention score by q_l . E[clamp(r - l)] / sqrt(D), where E holds one
D-dimensional embedding per distance (left_max + right_max + 1 = 73 of them). transformers
(`_apply_relative_key_position_encoding`) first gathers E into an L x L x D tensor, one embedding per
(query, key) pair, then contracts it with q in an einsum: 144 MB per layer and batch row at L = 750
frames in fp32, and the slowest part of the layer. The bias only ever takes 73 distinct values per
query, so `gathered_relative_key_bias` computes q . E^T (B x H x L x 73, one small matmul) and picks
each pair's value by its distance (a gather): the same numbers, summed in the same order over D, with
no L x L x D tensor, forward or backward. benchmarks/relative_key_bias.py measures both; the test
suite checks the outputs and gradients against transformers' own path for every attention kernel.

`use_relative_key_bias("gather")` (model.relative_key_bias in conf/model/) installs it in place of
transformers' function; weights and state-dict keys are untouched.
"""

from __future__ import annotations

import torch
from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as modeling

from asr.errors import ConfigError

_TRANSFORMERS_BIAS = modeling._apply_relative_key_position_encoding
BIAS_PATHS = ("gather", "einsum")


def distance_index(module, query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """L x R indices into the distance table: clamp(r - l) + left_max, as transformers computes them."""
    distance = torch.arange(key_length, device=device)[None, :] - torch.arange(query_length, device=device)[:, None]
    distance = distance.clamp(-module.left_max_position_embeddings, module.right_max_position_embeddings)
    return distance + module.left_max_position_embeddings


def gathered_relative_key_bias(module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, bias) exactly as transformers' `_apply_relative_key_position_encoding` returns them."""
    batch, heads, query_length, _ = query.shape
    table = module.distance_embedding.weight.to(dtype=query.dtype)  # (left + right + 1) x D
    per_distance = torch.matmul(query, table.t())  # B x H x L x P
    index = distance_index(module, query_length, key.shape[2], query.device)
    bias = per_distance.gather(-1, index.expand(batch, heads, query_length, index.shape[1]))
    return query, bias * module.scaling


def use_relative_key_bias(path: str) -> None:
    """gather: q . E^T, then each pair's value by distance | einsum: transformers' own L x L x D path."""
    if path not in BIAS_PATHS:
        raise ConfigError(f"model.relative_key_bias={path!r} is not a bias path. Fix: gather or einsum")
    modeling._apply_relative_key_position_encoding = (
        gathered_relative_key_bias if path == "gather" else _TRANSFORMERS_BIAS
    )
