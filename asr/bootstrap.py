"""How sure is a WER? Per-utterance error counts, bootstrap intervals, paired comparisons.

All statistics resample *units* (speakers when known, else utterances) and recompute the
corpus-level rate Σerrors / Σreference-length on each resample, the standard bootstrap for WER.
Resampling speakers is the honest choice when a test set holds several utterances per speaker:
their errors are correlated, and utterance resampling would give too narrow an interval.
"""

from __future__ import annotations

from collections import Counter

import jiwer
import numpy as np


def utterance_counts(references: list[str], hypotheses: list[str]) -> dict[str, np.ndarray]:
    """Word and character errors (S+D+I) and reference lengths, one entry per utterance."""
    words = jiwer.process_words(references, hypotheses)
    chars = jiwer.process_characters(references, hypotheses)

    def errors(alignments) -> np.ndarray:
        return np.array(
            [
                sum(
                    max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
                    for c in chunks
                    if c.type != "equal"
                )
                for chunks in alignments
            ]
        )

    return {
        "word_errors": errors(words.alignments),
        "words": np.array([len(ref) for ref in words.references]),
        "char_errors": errors(chars.alignments),
        "chars": np.array([len(ref) for ref in chars.references]),
    }


def _units(groups: list[str] | None, n: int) -> np.ndarray:
    return np.unique(groups, return_inverse=True)[1] if groups is not None else np.arange(n)


def bootstrap_rates(
    errors: np.ndarray, lengths: np.ndarray, groups: list[str] | None, resamples: int, seed: int
) -> np.ndarray:
    """The rate recomputed on `resamples` bootstrap samples of the units."""
    units = _units(groups, len(errors))
    unit_errors, unit_lengths = np.bincount(units, weights=errors), np.bincount(units, weights=lengths)
    picks = np.random.default_rng(seed).integers(0, len(unit_errors), size=(resamples, len(unit_errors)))
    return unit_errors[picks].sum(axis=1) / np.maximum(unit_lengths[picks].sum(axis=1), 1)


def confidence_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(
    errors_a: np.ndarray, errors_b: np.ndarray, lengths: np.ndarray, groups: list[str] | None, resamples: int, seed: int
) -> dict[str, float]:
    """WER(B) - WER(A) on the same resampled units: interval, share of resamples where B is better, p."""
    diffs = bootstrap_rates(errors_b - errors_a, lengths, groups, resamples, seed)
    low, high = confidence_interval(diffs)
    p = min(1.0, 2 * min(float(np.mean(diffs >= 0)), float(np.mean(diffs <= 0))))
    point = float((errors_b.sum() - errors_a.sum()) / max(lengths.sum(), 1))
    return {
        "difference": point,
        "ci_low": low,
        "ci_high": high,
        "b_better_share": float(np.mean(diffs < 0)),
        "p_value": p,
    }


def verdict(diff: dict[str, float], metric: str = "WER") -> str:
    """One line, in percentage points: "B better than A: WER -0.8 [-1.3, -0.3], p≈0.002"."""
    numbers = (
        f"{metric} {diff['difference'] * 100:+.2f} [{diff['ci_low'] * 100:+.2f}, "
        f"{diff['ci_high'] * 100:+.2f}], p≈{diff['p_value']:.3g}"
    )
    if diff["ci_high"] < 0:
        return f"B better than A: {numbers}"
    if diff["ci_low"] > 0:
        return f"B worse than A: {numbers}"
    return f"no significant difference: {numbers}"


def per_speaker(speakers: list[str], counts: dict[str, np.ndarray]) -> list[dict]:
    """WER per speaker, worst first."""
    rows = []
    for speaker in sorted(set(speakers)):
        mask = np.array([s == speaker for s in speakers])
        rows.append(
            {
                "speaker": speaker,
                "utterances": int(mask.sum()),
                "words": int(counts["words"][mask].sum()),
                "wer": float(counts["word_errors"][mask].sum() / max(counts["words"][mask].sum(), 1)),
            }
        )
    return sorted(rows, key=lambda row: -row["wer"])


def char_confusions(references: list[str], hypotheses: list[str], top: int) -> list[dict]:
    """Most frequent character substitutions, deletions (→ ∅) and insertions (∅ →)."""
    chars = jiwer.process_characters(references, hypotheses)
    counts: Counter = Counter()
    for ref, hyp, chunks in zip(chars.references, chars.hypotheses, chars.alignments):
        for c in chunks:
            if c.type == "substitute":
                counts.update(zip(ref[c.ref_start_idx : c.ref_end_idx], hyp[c.hyp_start_idx : c.hyp_end_idx]))
            elif c.type == "delete":
                counts.update((r, "∅") for r in ref[c.ref_start_idx : c.ref_end_idx])
            elif c.type == "insert":
                counts.update(("∅", h) for h in hyp[c.hyp_start_idx : c.hyp_end_idx])
    return [{"reference": r, "hypothesis": h, "count": n} for (r, h), n in counts.most_common(top)]
