"""Audio decoding (core/audio.py): every format it names, decoded into one channel at the model's
rate with its content kept; the same bytes always give the same samples; clips too long (whatever
their header says), at an odd rate, of too many channels, or not audio at all are refused by name."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from audiofiles import FORMATS, encoded, tone
from embedding_worker.core.audio import MAX_FACTOR, AudioError, AudioPolicy, decode, ratio, resample


def peak_hertz(samples: np.ndarray, rate: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * rate / len(samples))


@pytest.mark.parametrize("fmt, subtype, rate", FORMATS)
def test_each_format_decodes_to_one_channel_at_the_models_rate(fmt, subtype, rate):
    data = encoded(tone(rate, 2.0), rate, fmt, subtype)
    clip = decode(data, 48000)
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert abs(clip.seconds - 2.0) < 0.01
    assert abs(len(clip.samples) - 96000) <= 48  # lossy codecs' padding: a millisecond at most
    assert abs(peak_hertz(clip.samples, 48000) - 1000) < 1  # the tone is where it was
    loudness = np.sqrt(np.mean(clip.samples[4800:-4800] ** 2))  # (0.5 + 0.1) / 2 / sqrt(2)
    assert abs(loudness - 0.3 / np.sqrt(2)) < 0.03
    again = decode(data, 48000)
    np.testing.assert_array_equal(again.samples, clip.samples)  # the same bytes, the same samples


def test_the_models_own_rate_passes_untouched():
    mono = tone(48000, 0.5, channels=1)
    clip = decode(encoded(mono, 48000, "WAV", "FLOAT"), 48000)
    np.testing.assert_array_equal(clip.samples, mono[:, 0])
    np.testing.assert_array_equal(resample(clip.samples, 48000, 48000), clip.samples)
    # 44.1 kHz -> 48 kHz by 160/147: a second is a second
    assert len(resample(np.zeros(44100, np.float32), 44100, 48000)) == 48000


@pytest.mark.parametrize("source", [8000, 11025, 16000, 22050, 32000, 44100, 88200, 96000,
                                    176400, 192000])
def test_the_usual_rates_resample_by_their_exact_ratio(source):
    up, down = ratio(source, 48000)
    assert up * source == down * 48000


@pytest.mark.parametrize("source", [4001, 44101, 191999])
def test_an_odd_rate_costs_no_more_than_a_usual_one(source):
    """Its exact ratio would need a filter of millions of taps (seconds and hundreds of MB a
    clip); the nearest ratio of small terms keeps the tone where it was."""
    up, down = ratio(source, 48000)
    assert max(up, down) <= MAX_FACTOR
    assert abs(up / down * source / 48000 - 1) < 5e-4
    clip = decode(encoded(tone(source, 2.0, 1000.0, channels=1), source), 48000)
    assert abs(len(clip.samples) - 96000) <= 96000 * 5e-4
    assert abs(peak_hertz(clip.samples, 48000) - 1000) < 1


def test_a_clip_over_the_cap_is_refused_whatever_its_header_says():
    rate = 8000
    long = encoded(tone(rate, 5.0, channels=1), rate)
    with pytest.raises(AudioError, match=r"longer than 4 s \(AUDIO_MAX_SECONDS\)"):
        decode(long, 16000, AudioPolicy(max_seconds=4))
    assert decode(long, 16000, AudioPolicy(max_seconds=5)).seconds == 5.0
    # a WAV whose header gives no length (0xFFFFFFFF, as a stream writes it): read until the cap,
    # not trusted, not read whole
    header = long[:44]
    assert header[36:40] == b"data"
    endless = header[:4] + struct.pack("<I", 0xFFFFFFFF) + header[8:40] + \
        struct.pack("<I", 0xFFFFFFFF) + long[44:] * 20
    with pytest.raises(AudioError, match="longer than 4 s"):
        decode(endless, 16000, AudioPolicy(max_seconds=4))


@pytest.mark.parametrize("data, message", [
    (b"hello, not a sound", r"not audio this server reads \(WAV, FLAC, Ogg \(Vorbis, Opus\) or "
                            r"MP3\): Format not recognised"),
    (b"", "not audio this server reads"),
    (encoded(tone(2000, 1.0, channels=1), 2000), "sampling rate 2000 Hz is outside 4000-192000 Hz"),
    (encoded(tone(8000, 1.0, channels=12), 8000), "12 channels; at most 8"),
    (encoded(np.zeros((0, 1), np.float32), 8000), "the audio holds no samples"),
    (encoded(np.full((800, 1), np.nan, np.float32), 8000, "WAV", "FLOAT"),
     "samples that are not finite numbers"),
])
def test_what_is_refused(data, message):
    with pytest.raises(AudioError, match=message):
        decode(data, 48000)


def test_a_cut_file_gives_what_it_holds_or_a_named_error():
    """A file cut short (a truncated upload) never crashes the decoder nor hangs."""
    for fmt, subtype, rate in FORMATS:
        data = encoded(tone(rate, 2.0), rate, fmt, subtype)
        for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
            try:
                clip = decode(data[:cut], 48000)
            except AudioError as exc:
                assert str(exc)
            else:
                assert 0 < clip.seconds <= 2.0 and np.isfinite(clip.samples).all()


def test_decoding_stops_at_its_deadline():
    """The deadline is checked between blocks (the server's wait for it ends there too)."""
    import time

    data = encoded(tone(44100, 3.0), 44100)
    with pytest.raises(AudioError, match=r"decoding did not finish in time \(HTTP_CLIENT_TIMEOUT\)"):
        decode(data, 48000, deadline=time.monotonic() - 1)
    assert decode(data, 48000, deadline=time.monotonic() + 60).seconds == 3.0


def test_a_first_clip_does_not_pay_for_the_imports_within_its_deadline():
    """soundfile and scipy take ~1 s to import; a server's first clip, with a deadline shorter
    than that, is decoded all the same (the imports happen before its clock starts)."""
    import base64
    import subprocess
    import sys

    data = base64.b64encode(encoded(tone(44100, 0.2, channels=1), 44100)).decode()  # resampled
    code = f"""
import asyncio, sys
from embedding_worker.config import Settings
from embedding_worker.core.media import MediaFetcher
assert "scipy.signal" not in sys.modules and "soundfile" not in sys.modules
clips = asyncio.run(MediaFetcher(Settings(http_client_timeout=0.3)).load_audio([{data!r}], 48000))
print(len(clips[0].samples))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["9600"]
