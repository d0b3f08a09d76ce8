"""Audio inputs decoded safely: a clip's bytes (fetched by `media`, as images are) into one
channel of float32 samples at the model's sampling rate.

A clip must not be able to take the server's memory or time, whatever its header says: MP3 and
Ogg headers carry no reliable length (a WAV's can lie too), so the samples are read in blocks and
the decoding stops as soon as the clip passes the duration cap; each block is folded to one
channel as it comes, so memory is bounded by the cap in seconds times the rate, not by the file.
The sampling rate and the channel count are checked before a sample is read. Resampling is
polyphase (scipy's `resample_poly`) by the ratio of the two rates, in terms small enough that an
odd rate costs no more than a usual one (`ratio`): the same bytes always give the same samples.
libsndfile (through `soundfile`) reads WAV, FLAC, Ogg Vorbis and Opus, and MP3; it and scipy are
imported at the first clip, not by a service that never sees one. A deadline, when given, is
checked between blocks.
"""

from __future__ import annotations

import importlib
import io
import math
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

FORMATS = "WAV, FLAC, Ogg (Vorbis, Opus) or MP3"
_BLOCK = 1 << 16  # frames decoded at a time
MAX_FACTOR = 1024  # the resampling's largest up or down factor (`ratio`)


class AudioError(Exception):
    """Why one item is not usable audio; the caller adds the item's index."""


@dataclass(frozen=True)
class AudioPolicy:
    max_seconds: float = 30.0  # a longer clip is refused, not cut (the cut would be ours to pick)
    min_rate: int = 4_000
    max_rate: int = 192_000
    max_channels: int = 8


@dataclass(frozen=True)
class Clip:
    samples: np.ndarray  # float32, one channel, at the rate asked for
    seconds: float  # the clip's own length


def load_libraries() -> None:
    """Import libsndfile's binding and scipy's resampler (~0.3-1 s the first time): done before a
    first clip's deadline starts, which is the clip's, not the server's imports."""
    for name in ("soundfile", "scipy.signal"):
        importlib.import_module(name)


def decode(data: bytes, rate: int, policy: AudioPolicy = AudioPolicy(),
           deadline: float | None = None) -> Clip:
    """The clip in `data` as one channel at `rate` Hz (channels averaged); `deadline`: a
    `time.monotonic()` past which decoding stops."""
    import soundfile as sf

    try:
        stream = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"not audio this server reads ({FORMATS}): {_reason(exc)}") from None
    with stream:
        source = stream.samplerate
        if not policy.min_rate <= source <= policy.max_rate:
            raise AudioError(f"sampling rate {source} Hz is outside {policy.min_rate}-"
                             f"{policy.max_rate} Hz")
        if not 1 <= stream.channels <= policy.max_channels:
            raise AudioError(f"{stream.channels} channels; at most {policy.max_channels}")
        most = math.floor(policy.max_seconds * source)
        blocks, frames = [], 0
        try:
            for block in stream.blocks(blocksize=_BLOCK, dtype="float32", always_2d=True):
                frames += len(block)
                if frames > most:
                    raise AudioError(f"longer than {policy.max_seconds:g} s (AUDIO_MAX_SECONDS)")
                blocks.append(block.mean(axis=1, dtype=np.float32))
                if deadline is not None and time.monotonic() > deadline:
                    raise AudioError("decoding did not finish in time (HTTP_CLIENT_TIMEOUT)")
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"the audio could not be decoded: {_reason(exc)}") from None
    if frames == 0:
        raise AudioError("the audio holds no samples")
    samples = np.concatenate(blocks)
    if not np.isfinite(samples).all():
        raise AudioError("the audio holds samples that are not finite numbers")
    return Clip(resample(samples, source, rate), frames / source)


def resample(samples: np.ndarray, source: int, target: int) -> np.ndarray:
    """`samples` at `source` Hz as `target` Hz (unchanged when they are the same)."""
    if source == target:
        return samples
    from scipy.signal import resample_poly

    up, down = ratio(source, target)
    return resample_poly(samples, up, down).astype(np.float32)


def ratio(source: int, target: int) -> tuple[int, int]:
    """Up and down factors from `source` Hz to `target` Hz, neither over `MAX_FACTOR`. The
    polyphase filter has ~20 taps per unit of the larger factor: the exact ratio of an odd rate
    (191,999 Hz to 48 kHz: 48,000 / 191,999) would cost 0.9 s and 200 MB a clip, so such a rate
    is taken at the nearest ratio of small terms (within 0.05 %); the usual rates are exact."""
    limit = max(1, min(MAX_FACTOR, MAX_FACTOR * source // target))
    near = Fraction(target, source).limit_denominator(limit)
    return near.numerator, near.denominator


def _reason(exc: BaseException) -> str:
    """libsndfile's own words, without the object's repr it puts before them."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.split(">: ", 1)[-1]
