"""Audio files made here: a tone in every format the service reads."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

# (container, codec, a rate it takes): WAV, FLAC, Ogg Vorbis and Opus, MP3
FORMATS = [("WAV", "PCM_16", 44100), ("WAV", "FLOAT", 16000), ("FLAC", "PCM_24", 44100),
           ("OGG", "VORBIS", 44100), ("OGG", "OPUS", 48000), ("MP3", "MPEG_LAYER_III", 44100)]


def tone(rate: int, seconds: float, hertz: float = 1000.0, channels: int = 2) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    left = 0.5 * np.sin(2 * np.pi * hertz * t)
    # the other channels are quiet copies: the mono mix is their mean
    return np.stack([left] + [0.1 * left] * (channels - 1), axis=1).astype(np.float32)


def encoded(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()
