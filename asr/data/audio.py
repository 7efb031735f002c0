"""Decode audio files to 16 kHz mono float32: the one place where resampling and down-mixing happen.

datasets' own `Audio` decoding needs torchcodec (CUDA torch + FFmpeg), so we decode with
soundfile (libsndfile: FLAC, WAV, OGG, ...) and resample with soxr.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioDecodeError(RuntimeError):
    """An audio file that cannot be read; the message names the file."""


def mono_resampled(audio: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Average channels, then resample with soxr's high-quality filter."""
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sample_rate != target_rate:
        audio = soxr.resample(audio, sample_rate, target_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_audio(path: str | Path, target_rate: int) -> np.ndarray:
    """Read any libsndfile format; a corrupt or missing file raises AudioDecodeError naming it."""
    try:
        audio, sample_rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioDecodeError(f"{path}: {err}") from err
    if audio.size == 0:
        raise AudioDecodeError(f"{path}: the file holds no audio samples")
    return mono_resampled(audio, sample_rate, target_rate)
