"""The data audit: quarantine bad utterances with a reason instead of training on them.

One corrupt FLAC can make the validation loss infinite and waste days of GPU time; a few
hundred silent or misaligned clips quietly hurt WER. Every utterance is decoded once, during
feature extraction (asr.features records what it saw), and classified here, so the audit adds
no second decoding pass. Bad rows are dropped and written to `data_audit.json`; only a bad
share above `audit.max_bad_fraction` stops the run.

    python -m asr.audit dataset=openslr54 dataset.root=/data/openslr54    # the audit alone
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import hydra
from datasets import DatasetDict
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from transformers import Wav2Vec2BertConfig

from asr import cli
from asr.data import DataError

log = logging.getLogger(__name__)

TRAIN_ONLY = ("too_short", "too_long", "silent", "ctc_infeasible")  # learning filters; eval sets stay whole


def output_frames(config: Wav2Vec2BertConfig, input_length: int) -> int:
    """CTC output frames for `input_length` feature frames: each adapter layer is a strided conv."""
    length = input_length
    if config.add_adapter:
        pad = config.adapter_kernel_size // 2
        for _ in range(config.num_adapter_layers):
            length = (length + 2 * pad - config.adapter_kernel_size) // config.adapter_stride + 1
    return length


def classify(row: dict, split: str, cfg: DictConfig, model_config: Wav2Vec2BertConfig) -> tuple[str, str]:
    """(reason, detail) for a bad row, ("", "") for a good one."""
    if row["audio_error"]:
        reason, _, detail = row["audio_error"].partition(": ")
        return reason, detail
    if row["text_rejected"]:
        return "text_rejected", row["text_rejected"]
    if not row["text"]:
        return "empty_text", "transcript empty after normalisation"
    if split != "train":
        return "", ""
    if row["duration"] < cfg.min_seconds:
        return "too_short", f"{row['duration']:.2f} s < {cfg.min_seconds} s"
    if row["duration"] > cfg.max_seconds:
        return "too_long", f"{row['duration']:.2f} s > {cfg.max_seconds} s"
    if row["rms_db"] < cfg.silence_db:
        return "silent", f"RMS {row['rms_db']:.1f} dBFS < {cfg.silence_db}"
    labels = row["labels"]
    needed = len(labels) + sum(a == b for a, b in zip(labels, labels[1:]))  # a blank between repeated letters
    frames = output_frames(model_config, row["input_length"])
    if needed > frames:
        return "ctc_infeasible", f"{needed} CTC steps needed, {frames} output frames"
    return "", ""


def run_audit(
    features: DatasetDict,
    cfg: DictConfig,
    model_config: Wav2Vec2BertConfig,
    report_path: Path,
    allow_missing: bool = False,
) -> tuple[DatasetDict, dict]:
    """Clean splits + the report (also written to report_path); raises past max_bad_fraction.

    `allow_missing` (dataset.allow_missing_audio): files the user knows are absent are listed as
    missing_file like any other drop, but do not count towards max_bad_fraction.
    """
    columns = [
        "id",
        "audio_path",
        "text",
        "text_rejected",
        "duration",
        "rms_db",
        "labels",
        "input_length",
        "audio_error",
    ]
    clean, files, totals = DatasetDict(), [], {}
    for split, rows in features.items():
        keep = []
        for index, row in enumerate(rows.select_columns(columns)):
            reason, detail = classify(row, split, cfg, model_config)
            if reason:
                files.append(
                    {"split": split, "id": row["id"], "path": row["audio_path"], "reason": reason, "detail": detail}
                )
            else:
                keep.append(index)
        clean[split] = rows.select(keep) if len(keep) < len(rows) else rows
        totals[split] = len(rows)
    by_reason = Counter(f["reason"] for f in files)
    report = {
        "rows": sum(totals.values()),
        "quarantined": len(files),
        "by_reason": dict(by_reason.most_common()),
        "by_split": {s: {"rows": totals[s], "quarantined": sum(f["split"] == s for f in files)} for s in totals},
        "settings": {k: cfg[k] for k in cfg},
        "files": files,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    reasons = ", ".join(f"{reason} {count}" for reason, count in by_reason.most_common())
    log.info(
        "audit: %d rows, %d quarantined%s → %s",
        report["rows"],
        len(files),
        f" ({reasons})" if files else "",
        report_path,
    )
    _check_enough_left(report, files, cfg, allow_missing, reasons, report_path)
    return clean, report


def _check_enough_left(
    report: dict, files: list[dict], cfg: DictConfig, allow_missing: bool, reasons: str, report_path: Path
) -> None:
    """A split with nothing left, or a train split losing more than audit.max_bad_fraction, stops the run."""
    for split, numbers in report["by_split"].items():
        if numbers["rows"] == numbers["quarantined"]:
            raise DataError(f"every {split} utterance was quarantined ({reasons}); see {report_path}")
    train = report["by_split"].get("train")
    tolerated = sum(f["split"] == "train" and f["reason"] == "missing_file" for f in files) if allow_missing else 0
    if train and (train["quarantined"] - tolerated) / max(train["rows"] - tolerated, 1) > cfg.max_bad_fraction:
        raise DataError(
            f"{train['quarantined']} of {train['rows']} train utterances were quarantined ({reasons}), more than "
            f"audit.max_bad_fraction={cfg.max_bad_fraction}; see {report_path}. Fix the data, or raise the "
            "threshold if this is expected."
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> int:
    """The audit alone: decodes and checks everything (caching the features for training), trains nothing."""
    from asr.model import shape_config
    from asr.prepare import prepare

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with cli.user_errors():
        _, features, _ = prepare(cfg, output_dir)
        report = run_audit(
            features,
            cfg.audit,
            shape_config(cfg.model),
            output_dir / "data_audit.json",
            allow_missing=cfg.dataset.get("allow_missing_audio", False),
        )[1]
    return report["quarantined"]


if __name__ == "__main__":
    cli.run(main)
