"""Decode audio files to 16 kHz mono float32: the one place where resampling and down-mixing happen.

datasets' own `Audio` decoding needs torchcodec (CUDA torch + FFmpeg), so we decode with
soundfile (libsndfile: FLAC, WAV, OGG, ...) and resample with soxr.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

ZIP_MEMBER = "::"  # "<archive.zip>::<member>": audio read in place from a downloaded archive
_open_archives: dict[tuple[int, str], zipfile.ZipFile] = {}  # per process: forked workers must not share file offsets


class AudioDecodeError(RuntimeError):
    """An audio file that cannot be read; the message names the file."""


def mono_resampled(audio: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Average channels, then resample with soxr's high-quality filter."""
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sample_rate != target_rate:
        audio = soxr.resample(audio, sample_rate, target_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def zip_member_path(archive: str | Path, member: str) -> str:
    return f"{Path(archive).resolve()}{ZIP_MEMBER}{member}"


def source_file(path: str | Path) -> Path:
    """The file on disk that holds the audio (the archive, for a zip member)."""
    return Path(str(path).split(ZIP_MEMBER, 1)[0])


def _read_source(path: str):
    if ZIP_MEMBER not in path:
        return path
    archive, member = path.split(ZIP_MEMBER, 1)
    key = (os.getpid(), archive)
    if key not in _open_archives:
        _open_archives[key] = zipfile.ZipFile(archive)
    return io.BytesIO(_open_archives[key].read(member))


def load_audio(path: str | Path, target_rate: int) -> np.ndarray:
    """Read any libsndfile format (also from inside a zip); a corrupt or missing file raises AudioDecodeError
    naming it."""
    try:
        audio, sample_rate = sf.read(_read_source(str(path)), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise AudioDecodeError(f"{path}: {err}") from err
    if audio.size == 0:
        raise AudioDecodeError(f"{path}: the file holds no audio samples")
    return mono_resampled(audio, sample_rate, target_rate)
