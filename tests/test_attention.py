"""The gathered relative_key bias (asr/attention.py) is transformers' own bias, computed without the
L x L x D tensor: same outputs and gradients for every attention kernel we offer, with padding."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC

from asr.attention import gathered_relative_key_bias, use_relative_key_bias
from asr.errors import ConfigError

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`

TINY = compose_cfg().model.config  # conf/model/tiny.yaml's shape
FULL_WIDTH_2_LAYERS = {  # w2v-bert-2.0's layer shape, two layers
    "hidden_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "output_hidden_size": 1024,
    "num_adapter_layers": 1,
    "feature_projection_input_dim": 160,
}


def _outputs_and_grads(config: Wav2Vec2BertConfig, attn: str, path: str, features, mask, labels):
    use_relative_key_bias(path)
    torch.manual_seed(0)
    model = Wav2Vec2BertForCTC._from_config(config, attn_implementation=attn).train()
    out = model(input_features=features, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, set(model.state_dict())


@pytest.mark.parametrize("shape", [TINY, FULL_WIDTH_2_LAYERS], ids=["tiny", "full-width-2-layers"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gathered_bias_equals_transformers_forward_and_backward(shape, attn):
    config = Wav2Vec2BertConfig(
        **dict(shape),
        vocab_size=40,
        add_adapter=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
    )
    assert config.position_embeddings_type == "relative_key"
    torch.manual_seed(1)
    frames = 120  # past left_max (64): the clamped distances are exercised too
    features = torch.randn(2, frames, config.feature_projection_input_dim)
    mask = torch.ones(2, frames, dtype=torch.long)
    mask[1, 70:] = 0  # a padded second row
    labels = torch.randint(1, 40, (2, 12))
    try:
        ours = _outputs_and_grads(config, attn, "gather", features, mask, labels)
        theirs = _outputs_and_grads(config, attn, "einsum", features, mask, labels)
    finally:
        use_relative_key_bias("gather")
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert ours[1].keys() == theirs[1].keys()
    for name in theirs[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert ours[2] == theirs[2]  # a forward change: the same weights, the same state-dict keys


def test_bias_values_match_for_every_query_key_pair():
    """The bias itself, query length != key length included."""

    class Layer(torch.nn.Module):
        left_max_position_embeddings, right_max_position_embeddings, scaling = 64, 8, 0.125
        distance_embedding = torch.nn.Embedding(64 + 8 + 1, 16)

    from asr.attention import _TRANSFORMERS_BIAS

    layer = Layer()
    query, key = torch.randn(2, 3, 90, 16), torch.randn(2, 3, 100, 16)
    torch.testing.assert_close(
        gathered_relative_key_bias(layer, query, key)[1], _TRANSFORMERS_BIAS(layer, query, key)[1]
    )


def test_an_unknown_bias_path_is_a_one_line_error():
    with pytest.raises(ConfigError, match="Fix: gather or einsum"):
        use_relative_key_bias("flash")
