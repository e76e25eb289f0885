"""Audio files -> mono float32 samples at the model's rate.

Decoding with soundfile (libsndfile: WAV, FLAC, OGG, ...; any channel count, mixed down by
averaging); resampling with soxr (band-limited, high quality), never by interpolation.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

RATE = 16_000


class AudioError(ValueError):
    """A file that cannot be decoded (the message says why)."""


def audio_info(path: str) -> Tuple[int, int]:
    """(frames, sample rate) from the file's header, without decoding it."""
    import soundfile

    try:
        info = soundfile.info(path)
    except Exception as e:  # libsndfile's errors: unknown format, truncated header, not audio
        raise AudioError(f"unreadable audio {path}: {e}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"unreadable audio {path}: {info.frames} frames at {info.samplerate} Hz")
    return int(info.frames), int(info.samplerate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """[L] float32 at from_rate -> [round(L * to_rate / from_rate)] float32 at to_rate (soxr, HQ)."""
    if from_rate == to_rate:
        return audio
    import soxr

    return soxr.resample(audio, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def resampled_length(frames: int, from_rate: int, to_rate: int = RATE) -> int:
    """The length ``resample`` gives (soxr rounds to the nearest sample)."""
    return frames if from_rate == to_rate else int(round(frames * to_rate / from_rate))


def read_audio(path: str, rate: int = RATE) -> np.ndarray:
    """[L] mono float32 in [-1, 1] at ``rate`` Hz (resampled when the file has another rate)."""
    import soundfile

    try:
        audio, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"unreadable audio {path}: {e}") from None
    if audio.shape[0] == 0:
        raise AudioError(f"unreadable audio {path}: no samples")
    return resample(audio.mean(axis=1), file_rate, rate)
