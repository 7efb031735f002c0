"""Text → labels and audio → log-mel features, cached on disk by content.

The processor pairs `SeamlessM4TFeatureExtractor` (what w2v-bert-2.0 was pretrained on: 80 mel
bins stacked by 2 → 160-dim frames at 50 per second) with a character-level
`Wav2Vec2CTCTokenizer` whose vocab comes from the train split only, so dev/test characters
the model never saw become [UNK] instead of silently leaking into the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from datasets import DatasetDict
from omegaconf import DictConfig, OmegaConf
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertProcessor, Wav2Vec2CTCTokenizer

from asr.data import SPLITS, split_fingerprint
from asr.data.audio import AudioDecodeError, load_audio, source_file
from asr.data.text import normalize_text

log = logging.getLogger(__name__)

UNK, PAD, WORD_DELIMITER = "[UNK]", "[PAD]", "|"
FEATURE_CACHE_VERSION = 2  # bump when extract_features changes what it stores


def normalize_splits(splits: DatasetDict, text_cfg: DictConfig) -> DatasetDict:
    """Normalise transcripts everywhere; `text_rejected` says why a policy rejected one (the audit quarantines it)."""
    options = {k: v for k, v in OmegaConf.to_container(text_cfg, resolve=True).items() if k != "min_char_count"}

    def normalize(row: dict) -> dict:
        text, rejected = normalize_text(row["text"], **options)
        return {"text": text, "text_rejected": rejected}

    return splits.map(normalize, desc="Normalising text")


def build_vocab(train_texts: list[str], min_char_count: int = 1) -> dict[str, int]:
    """Characters seen >= min_char_count times in train, space as `|`, plus [UNK] and [PAD] (the CTC blank).

    A character rarer than that (a stray symbol, a typo) cannot be learned; as [UNK] it costs one
    vocabulary slot instead of one each.
    """
    chars = Counter("".join(train_texts))
    chars.pop(" ", None)
    vocab = {ch: i for i, ch in enumerate(sorted(ch for ch, n in chars.items() if n >= min_char_count))}
    for token in (WORD_DELIMITER, UNK, PAD):
        vocab[token] = len(vocab)
    return vocab


def build_processor(
    vocab: dict[str, int], feature_extractor: SeamlessM4TFeatureExtractor, folder: Path
) -> Wav2Vec2BertProcessor:
    """Tokenizer from vocab.json in `folder` (kept as a run artifact) + the model's feature extractor."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.json"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file),
        unk_token=UNK,
        pad_token=PAD,
        word_delimiter_token=WORD_DELIMITER,
        bos_token=None,
        eos_token=None,
    )  # CTC has no sentence-boundary tokens
    return Wav2Vec2BertProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def _cache_key(split_fingerprint: str, processor: Wav2Vec2BertProcessor, sample_rate: int) -> str:
    recipe = [
        FEATURE_CACHE_VERSION,
        split_fingerprint,
        sample_rate,
        processor.feature_extractor.to_json_string(),
        sorted(processor.tokenizer.get_vocab().items()),
    ]
    return hashlib.sha256(json.dumps(recipe, ensure_ascii=False).encode()).hexdigest()[:16]


def _featurize(row: dict, processor: Wav2Vec2BertProcessor, sample_rate: int) -> dict:
    """One utterance: features + labels, and what the audit needs (errors are recorded, not raised)."""
    frame_dims = processor.feature_extractor.feature_size * processor.feature_extractor.stride
    bad = {
        "input_features": np.zeros((0, frame_dims), np.float32),
        "labels": [],
        "input_length": 0,
        "duration": 0.0,
        "rms_db": -np.inf,
    }
    if not source_file(row["audio_path"]).exists():
        return {**bad, "audio_error": f"missing_file: {row['audio_path']} does not exist"}
    try:
        audio = load_audio(row["audio_path"], sample_rate)
    except AudioDecodeError as err:
        return {**bad, "audio_error": f"unreadable: {err}"}
    if not np.isfinite(audio).all():
        return {**bad, "duration": len(audio) / sample_rate, "audio_error": "non_finite: NaN or infinite samples"}
    features = processor.feature_extractor(audio, sampling_rate=sample_rate).input_features[0]
    return {
        "input_features": features,
        "labels": processor.tokenizer(row["text"]).input_ids,
        "input_length": len(features),
        "duration": len(audio) / sample_rate,
        "rms_db": float(20 * np.log10(np.sqrt(np.mean(audio**2)) + 1e-10)),
        "audio_error": "",
    }


def extract_features(
    splits: DatasetDict,
    processor: Wav2Vec2BertProcessor,
    cfg: DictConfig,
    cache_dir: Path,
    only: tuple[str, ...] = SPLITS,
) -> DatasetDict:
    """`datasets.map` with a content-keyed cache file per split; bad audio is left for asr.audit to quarantine."""
    out = DatasetDict()
    for split in only:
        key = _cache_key(split_fingerprint(splits[split]), processor, cfg.sample_rate)
        cache_file = cache_dir / f"features-{split}-{key}.arrow"
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        out[split] = splits[split].map(
            _featurize,
            fn_kwargs={"processor": processor, "sample_rate": cfg.sample_rate},
            num_proc=cfg.num_proc if len(splits[split]) >= 4 * cfg.num_proc else None,
            cache_file_name=str(cache_file),
            new_fingerprint=key,
            desc=f"Extracting {split} features",
        )
    return out
