"""The adapter-layerdrop fix: logits always have the length the CTC loss assumes."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC

from asr.model import disable_adapter_layerdrop

pytestmark = pytest.mark.fast  # the quick tier: `make test-fast`


def _tiny(layerdrop: float) -> Wav2Vec2BertForCTC:
    shape = OmegaConf.to_container(compose_cfg().model.config)
    torch.manual_seed(0)
    return Wav2Vec2BertForCTC(
        Wav2Vec2BertConfig(**shape, add_adapter=True, layerdrop=layerdrop, vocab_size=12, pad_token_id=11)
    )


def _logit_lengths_match(model: Wav2Vec2BertForCTC, steps: int) -> list[bool]:
    torch.manual_seed(1)
    features = torch.randn(3, 101, 160)
    attention_mask = torch.ones(3, 101, dtype=torch.long)
    attention_mask[1, 60:] = 0
    expected = int(model._get_feat_extract_output_lengths(attention_mask.sum(-1)).max())
    model.train()
    with torch.no_grad():
        return [
            model(input_features=features, attention_mask=attention_mask).logits.shape[1] == expected
            for _ in range(steps)
        ]


def test_fixed_model_never_drops_the_adapter_in_training():
    model = _tiny(layerdrop=0.5)
    disable_adapter_layerdrop(model)
    assert all(_logit_lengths_match(model, steps=200))
    assert model.config.layerdrop == 0.5  # encoder layerdrop is kept


def test_upstream_model_drops_the_adapter_as_often_as_layerdrop_says():
    """Documents the bug the fix is for; skips (telling us to drop the fix) once transformers fixes it."""
    mismatches = _logit_lengths_match(_tiny(layerdrop=0.5), steps=200).count(False)
    if mismatches == 0:
        pytest.skip("transformers no longer drops the adapter: asr.model.disable_adapter_layerdrop can go")
    assert 60 < mismatches < 140  # ~half of the steps skip the stride-2 adapter
