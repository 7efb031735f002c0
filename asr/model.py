"""Wav2Vec2BertForCTC from a pretrained checkpoint or, for offline/CPU work, from a config.

`model.pretrained=false` builds the configured shape with random weights and configured feature
settings, without reading `name_or_path`: the full-size w2v-bert-2.0 shape works offline
(benchmarks, smoke runs of the real recipe's compute).

Also fixes an upstream bug in the seed's recipe: with `add_adapter=True` the adapter reuses
`config.layerdrop`, so with layerdrop 0.1 about one training step in ten skips the (single,
stride-2) adapter layer. The logits are then twice as long as the CTC input lengths the loss
computes from `_get_feat_extract_output_lengths`, and the loss scores the wrong frames.
Encoder layerdrop is a useful regulariser; the adapter must never drop.

A second upstream leak: the adapter's stride-2 convolutions read the encoder's outputs at
*padded* positions (nothing zeroes them), so an utterance's last output frame, and through the
adapter's attention every other frame, changed with the amount of padding in its batch (greedy
transcripts too). `mask_adapter_padding` zeroes padded frames right before each adapter
convolution, which is what the convolution's own zero padding gives an unpadded utterance: the
logits are then the same for any padding (tested), so bounded padded shapes change nothing.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertForCTC, Wav2Vec2CTCTokenizer

from asr.attention import use_relative_key_bias
from asr.errors import ConfigError

log = logging.getLogger(__name__)


def from_checkpoint(model_cfg: DictConfig) -> bool:
    """True when weights (and shape, features) come from `name_or_path`; false for random init."""
    return bool(model_cfg.name_or_path) and model_cfg.get("pretrained", True)


def load_feature_extractor(model_cfg: DictConfig) -> SeamlessM4TFeatureExtractor:
    """The checkpoint's own feature settings when fine-tuning; the configured ones otherwise."""
    if from_checkpoint(model_cfg):
        return SeamlessM4TFeatureExtractor.from_pretrained(model_cfg.name_or_path)
    return SeamlessM4TFeatureExtractor(**OmegaConf.to_container(model_cfg.feature_extractor, resolve=True))


def shape_config(model_cfg: DictConfig) -> Wav2Vec2BertConfig:
    """The architecture alone (no weights): what the audit needs to count CTC output frames."""
    if from_checkpoint(model_cfg):
        config = Wav2Vec2BertConfig.from_pretrained(model_cfg.name_or_path)
    else:
        config = Wav2Vec2BertConfig(**OmegaConf.to_container(model_cfg.config, resolve=True))
    config.add_adapter = model_cfg.add_adapter
    return config


def _config_overrides(model_cfg: DictConfig, reg_cfg: DictConfig, tokenizer: Wav2Vec2CTCTokenizer) -> dict:
    overrides = {
        **OmegaConf.to_container(reg_cfg, resolve=True),
        "add_adapter": model_cfg.add_adapter,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,  # [PAD] doubles as the CTC blank
    }
    known = Wav2Vec2BertConfig().to_dict()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown Wav2Vec2BertConfig field(s) {unknown} in the regularization/model config. "
            "Fix: check the spelling against transformers' Wav2Vec2BertConfig"
        )
    return overrides


def disable_adapter_layerdrop(model: Wav2Vec2BertForCTC) -> None:
    """Keep encoder layerdrop, never drop the adapter (see module docstring)."""
    adapter = model.wav2vec2_bert.adapter
    if adapter is not None:
        adapter.layerdrop = 0.0


def mask_adapter_padding(model: Wav2Vec2BertForCTC) -> None:
    """Zero padded frames before the adapter convolutions (see module docstring); idempotent."""
    adapter = model.wav2vec2_bert.adapter
    if adapter is None or getattr(adapter, "_masks_padding", False):
        return
    state: dict = {}

    def adapter_input(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        state["lengths"] = None if mask is None else mask.sum(-1)

    def layer_input(module, args, kwargs):  # sub_sampled_lengths: this layer's output lengths
        state["current"], state["lengths"] = state["lengths"], kwargs.get("sub_sampled_lengths")

    def conv_input(module, args):
        lengths = state.get("current")
        if lengths is None:
            return None
        (x,) = args  # (batch, channels, frames)
        valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        return (x * valid[:, None, :].to(x.dtype),)

    adapter.register_forward_pre_hook(adapter_input, with_kwargs=True)
    for layer in adapter.layers:
        layer.register_forward_pre_hook(layer_input, with_kwargs=True)
        layer.residual_conv.register_forward_pre_hook(conv_input)
        layer.self_attn_conv.register_forward_pre_hook(conv_input)
    adapter._masks_padding = True


def build_model(
    model_cfg: DictConfig, reg_cfg: DictConfig, tokenizer: Wav2Vec2CTCTokenizer, attn_implementation: str | None = None
) -> Wav2Vec2BertForCTC:
    """`attn_implementation` (a trainer preset's choice) overrides model.attn_implementation."""
    overrides = _config_overrides(model_cfg, reg_cfg, tokenizer)
    attn = attn_implementation or model_cfg.attn_implementation
    use_relative_key_bias(model_cfg.relative_key_bias)  # the same bias, without an L x L x D tensor (asr/attention.py)
    if from_checkpoint(model_cfg):
        log.info("Loading pretrained %s", model_cfg.name_or_path)
        model = Wav2Vec2BertForCTC.from_pretrained(model_cfg.name_or_path, attn_implementation=attn, **overrides)
    else:
        if model_cfg.name_or_path:
            log.info("model.pretrained=false: random weights in the shape of %s", model_cfg.name_or_path)
        shape = OmegaConf.to_container(model_cfg.config, resolve=True)
        config = Wav2Vec2BertConfig(**shape, **overrides)
        model = Wav2Vec2BertForCTC._from_config(config, attn_implementation=attn)
    disable_adapter_layerdrop(model)
    mask_adapter_padding(model)
    log.info("Model: %.2f M parameters", model.num_parameters() / 1e6)
    return model
