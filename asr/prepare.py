"""The one preparation step training, the audit, evaluation and the benchmarks share:
dataset rows → normalised transcripts → vocabulary (train split only) → processor → cached features.
"""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict
from omegaconf import DictConfig
from transformers import Wav2Vec2BertProcessor

from asr.data import SPLITS, load_splits
from asr.features import build_processor, build_vocab, extract_features, normalize_splits
from asr.model import load_feature_extractor


def load_normalised(dataset_cfg: DictConfig) -> DatasetDict:
    """Every split's rows with transcripts normalised by `dataset.text` (rejections marked for the audit)."""
    return normalize_splits(load_splits(dataset_cfg), dataset_cfg.text)


def new_processor(cfg: DictConfig, splits: DatasetDict, model_dir: Path) -> Wav2Vec2BertProcessor:
    """A tokenizer over the train split's characters + the model's feature extractor, saved to model_dir."""
    vocab = build_vocab(splits["train"]["text"], cfg.dataset.text.min_char_count)
    return build_processor(vocab, load_feature_extractor(cfg.model), model_dir)


def features_for(
    splits: DatasetDict,
    processor: Wav2Vec2BertProcessor,
    dataset_cfg: DictConfig,
    cache_dir: str | Path,
    only: tuple[str, ...] = SPLITS,
) -> DatasetDict:
    """Input features and labels of `only` these splits, from the content-keyed cache when it has them."""
    return extract_features(splits, processor, dataset_cfg, Path(cache_dir) / "features", only=only)


def prepare(cfg: DictConfig, output_dir: Path) -> tuple[DatasetDict, DatasetDict, Wav2Vec2BertProcessor]:
    """A training run's data: (normalised rows, features, processor saved to <output_dir>/model)."""
    splits = load_normalised(cfg.dataset)
    processor = new_processor(cfg, splits, output_dir / "model")
    return splits, features_for(splits, processor, cfg.dataset, cfg.paths.cache_dir), processor
