"""Wav2Vec2BertForCTC from a pretrained checkpoint or, for offline/CPU work, from a config.

Also fixes an upstream bug in the seed's recipe: with `add_adapter=True` the adapter reuses
`config.layerdrop`, so with layerdrop 0.1 about one training step in ten skips the (single,
stride-2) adapter layer. The logits are then twice as long as the CTC input lengths the loss
computes from `_get_feat_extract_output_lengths`, and the loss scores the wrong frames.
Encoder layerdrop is a useful regulariser; the adapter must never drop.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertForCTC, Wav2Vec2CTCTokenizer

log = logging.getLogger(__name__)


def load_feature_extractor(model_cfg: DictConfig) -> SeamlessM4TFeatureExtractor:
    """The checkpoint's own feature settings when fine-tuning; the configured ones otherwise."""
    if model_cfg.name_or_path:
        return SeamlessM4TFeatureExtractor.from_pretrained(model_cfg.name_or_path)
    return SeamlessM4TFeatureExtractor(**OmegaConf.to_container(model_cfg.feature_extractor, resolve=True))


def shape_config(model_cfg: DictConfig) -> Wav2Vec2BertConfig:
    """The architecture alone (no weights): what the audit needs to count CTC output frames."""
    if model_cfg.name_or_path:
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
        raise ValueError(f"unknown Wav2Vec2BertConfig field(s) {unknown} in regularization/model config; "
                         "check the spelling against transformers' Wav2Vec2BertConfig")
    return overrides


def disable_adapter_layerdrop(model: Wav2Vec2BertForCTC) -> None:
    """Keep encoder layerdrop, never drop the adapter (see module docstring)."""
    adapter = model.wav2vec2_bert.adapter
    if adapter is not None:
        adapter.layerdrop = 0.0


def build_model(model_cfg: DictConfig, reg_cfg: DictConfig, tokenizer: Wav2Vec2CTCTokenizer) -> Wav2Vec2BertForCTC:
    overrides = _config_overrides(model_cfg, reg_cfg, tokenizer)
    if model_cfg.name_or_path:
        log.info("Loading pretrained %s", model_cfg.name_or_path)
        model = Wav2Vec2BertForCTC.from_pretrained(
            model_cfg.name_or_path, attn_implementation=model_cfg.attn_implementation, **overrides
        )
    else:
        shape = OmegaConf.to_container(model_cfg.config, resolve=True)
        config = Wav2Vec2BertConfig(**shape, **overrides)
        model = Wav2Vec2BertForCTC._from_config(config, attn_implementation=model_cfg.attn_implementation)
    disable_adapter_layerdrop(model)
    log.info("Model: %.2f M parameters", model.num_parameters() / 1e6)
    return model
