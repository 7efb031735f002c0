"""Speak text with eSpeak NG, through the `espeakng-loader` wheel or the `espeak-ng` binary.

The wheel ships libespeak-ng with the Nepali dictionary, so no root access or system
package is needed; the system binary is the fallback for platforms the wheel misses.
"""

from __future__ import annotations

import ctypes
import io
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from asr.errors import UserError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3
_CHARS_UTF8, _END_PAUSE = 1, 0x1000
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

NOT_FOUND_HELP = (
    "eSpeak NG is needed to generate the built-in synthetic Nepali corpus, and neither the "
    "Python wheel nor the system binary was found. Fix: `pip install espeakng-loader` "
    "(installed by `make setup`) or `apt-get install espeak-ng`. "
    "Or train on your own data: dataset=manifest dataset.train=/path/train.jsonl"
)


class EspeakNotFoundError(UserError, RuntimeError):
    """Neither libespeak-ng (the espeakng-loader wheel) nor the espeak-ng binary is installed."""


@dataclass(frozen=True)
class Voice:
    """One way of speaking: `language+variant` (e.g. `ne+f2`), words per minute and pitch (0-99)."""

    name: str
    speed: int
    pitch: int


def _load_library() -> ctypes.CDLL:
    import espeakng_loader

    lib = ctypes.CDLL(str(espeakng_loader.get_library_path()))
    lib.espeak_Info.restype = ctypes.c_char_p
    return lib


class _LibrarySpeaker:
    """Synthesis through libespeak-ng loaded with ctypes: ~200 utterances/s on one core."""

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = _load_library()
        data_path = str(espeakng_loader.get_data_path()).encode()
        self.sample_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if self.sample_rate <= 0:
            raise EspeakNotFoundError(f"libespeak-ng failed to initialise with data at {data_path!r}")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: ctypes does not
        self._lib.espeak_SetSynthCallback(self._callback)
        self.version = engine_version()

    def seed(self, value: int) -> None:
        """Seed eSpeak's own noise generator (whisper/breathy voices); else audio differs per process."""
        self._lib.espeak_ng_SetRandSeed(value)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice.name!r}")
        self._lib.espeak_SetParameter(_ESPEAK_RATE, voice.speed, 0)
        self._lib.espeak_SetParameter(_ESPEAK_PITCH, voice.pitch, 0)
        data = text.encode("utf-8")
        self._chunks = []
        self._lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8 | _END_PAUSE, None, None)
        self._lib.espeak_Synchronize()
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples.astype(np.float32) / 32768.0


class _BinarySpeaker:
    """Synthesis through the `espeak-ng` program (Debian/Ubuntu package `espeak-ng`)."""

    def __init__(self, binary: str) -> None:
        self._binary = binary
        self.version = engine_version()
        self.sample_rate = 22050

    def seed(self, value: int) -> None:
        """The program takes no seed; each call is a fresh process."""

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        cmd = [self._binary, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text]
        wav = subprocess.run(cmd, capture_output=True, check=True).stdout
        audio, self.sample_rate = sf.read(io.BytesIO(wav), dtype="float32")
        return audio


def engine_version() -> str:
    """Which eSpeak NG would speak, without initialising it (synthesis state must start fresh)."""
    try:
        return "libespeak-ng " + _load_library().espeak_Info(None).decode()
    except (ImportError, OSError):
        pass
    binary = shutil.which("espeak-ng")
    if binary:
        return subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    raise EspeakNotFoundError(NOT_FOUND_HELP)


def load_speaker() -> _LibrarySpeaker | _BinarySpeaker:
    """The wheel first (pinned by our install), else the system binary, else a clear error."""
    try:
        return _LibrarySpeaker()
    except (ImportError, OSError):
        pass
    binary = shutil.which("espeak-ng")
    if binary:
        return _BinarySpeaker(binary)
    raise EspeakNotFoundError(NOT_FOUND_HELP)
