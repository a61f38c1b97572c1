"""Round trips through StreamEncoder, decoded back with PyAV (numpy for raw pcm)."""

from __future__ import annotations

import io
import math
import struct

import av
import numpy as np
import pytest

from local_node.serving.audio import FORMATS, SAMPLE_RATE, StreamEncoder

SECONDS = 2.5
# Uneven on purpose: single samples, sizes straddling codec frames (576/1024/480/2304), long runs.
CHUNKS = [1, 700, 4800, 24000, 7, 1151, 24000, 5341]
assert sum(CHUNKS) == SECONDS * SAMPLE_RATE

# Container PyAV must recognise each format as (forced, so a mislabelled stream fails to open).
DEMUXERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}
DECODED_RATE = {fmt: 48000 if fmt == "opus" else SAMPLE_RATE for fmt in FORMATS}
# Decoded duration minus input duration, in seconds. Lossless formats and Ogg Opus (pre-skip and
# final granule position trim the codec delay) are exact. Raw MP3 and ADTS cannot signal encoder
# delay, so priming and last-frame padding stay: measured +68 ms (mp3) and +60 ms (aac).
EXTRA = {
    "pcm": (0, 0),
    "wav": (0, 0),
    "flac": (0, 0),
    "opus": (0, 0.001),
    "mp3": (0, 0.1),
    "aac": (0, 0.1),
}


def sine(seconds: float = SECONDS, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def encode(fmt: str, pcm: np.ndarray, chunks: list[int] = CHUNKS, speed: float = 1.0) -> tuple[bytes, bytes]:
    """Returns (bytes returned by encode() calls, all bytes including finish())."""
    encoder = StreamEncoder(fmt, speed=speed)
    streamed, start = b"", 0
    for size in chunks:
        streamed += encoder.encode(pcm[start : start + size])
        start += size
    assert start == len(pcm)
    return streamed, streamed + encoder.finish()


def decode(fmt: str, data: bytes) -> tuple[np.ndarray, int, int]:
    """Returns (mono samples in the decoder's dtype, sample rate, channel count)."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2"), SAMPLE_RATE, 1
    with av.open(io.BytesIO(data), format=DEMUXERS[fmt]) as container:
        frames = list(container.decode(audio=0))
    assert {f.layout.nb_channels for f in frames} == {1}
    (rate,) = {f.sample_rate for f in frames}
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]), rate, 1


def as_float(samples: np.ndarray) -> np.ndarray:
    return samples / 32767.0 if samples.dtype == np.int16 else samples.astype(np.float64)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def assert_is_the_sine(samples: np.ndarray, rate: int) -> None:
    y = as_float(samples)
    assert dominant_frequency(y, rate) == pytest.approx(440, abs=3)
    rms = math.sqrt(float(np.mean(y**2)))
    assert rms == pytest.approx(0.5 / math.sqrt(2), rel=0.1)  # not garbage, not silence


MAGIC = {
    "mp3": lambda b: b[0] == 0xFF and b[1] & 0xE0 == 0xE0,  # MPEG frame sync, no ID3 tag
    "opus": lambda b: b[:4] == b"OggS" and b[28:36] == b"OpusHead",
    "aac": lambda b: b[0] == 0xFF and b[1] & 0xF6 == 0xF0,  # ADTS sync, layer 0
    "flac": lambda b: b[:4] == b"fLaC",
    "wav": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WAVE",
    "pcm": lambda b: True,
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(fmt: str) -> None:
    pcm = sine()
    streamed, data = encode(fmt, pcm)
    assert streamed, "nothing came out before finish()"
    assert MAGIC[fmt](data)

    samples, rate, channels = decode(fmt, data)
    assert (rate, channels) == (DECODED_RATE[fmt], 1)
    low, high = EXTRA[fmt]
    assert low - 1e-9 <= len(samples) / rate - SECONDS <= high + 1e-9
    assert_is_the_sine(samples, rate)
    if fmt in ("pcm", "wav", "flac"):
        expected = np.round(pcm * 32767).astype(np.int16)
        np.testing.assert_array_equal(samples, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunking_changes_nothing(fmt: str) -> None:
    # No silence inserted or audio dropped at chunk boundaries: one big chunk decodes identically.
    pcm = sine()
    one_chunk = decode(fmt, encode(fmt, pcm, [len(pcm)])[1])[0]
    uneven = decode(fmt, encode(fmt, pcm)[1])[0]
    np.testing.assert_array_equal(one_chunk, uneven)


def test_wav_header_is_streaming() -> None:
    pcm = sine()
    _, data = encode("wav", pcm)
    riff, riff_size, wave = struct.unpack_from("<4sI4s", data, 0)
    assert (riff, riff_size, wave) == (b"RIFF", 0xFFFFFFFF, b"WAVE")
    # fmt chunk: 16 bytes, PCM, mono, 24 kHz, 48000 bytes/s, 2-byte frames, 16 bits
    fmt_chunk = struct.unpack_from("<4sIHHIIHH", data, 12)
    assert fmt_chunk == (b"fmt ", 16, 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
    assert struct.unpack_from("<4sI", data, 36) == (b"data", 0xFFFFFFFF)
    assert len(data) == 44 + 2 * len(pcm)  # canonical 44-byte header, then the samples
    samples, _, _ = decode("wav", data)
    assert len(samples) == len(pcm)  # the unknown size is read as "until end of file"


@pytest.mark.parametrize("fmt", FORMATS)
def test_audio_streams_out_before_finish(fmt: str) -> None:
    # After 1 s of input in 100 ms pieces, most of it must already be decodable from what
    # encode() returned (not just a header).
    pcm = sine(1.0)
    streamed, _ = encode(fmt, pcm, [2400] * 10)
    samples, rate, _ = decode(fmt, streamed)
    assert len(samples) / rate >= 0.5


@pytest.mark.parametrize(
    "fmt, speed",
    [
        *[("pcm", speed) for speed in (0.25, 0.5, 2.0, 4.0)],
        ("mp3", 2.0),
        ("opus", 0.5),
        ("aac", 4.0),
        ("flac", 0.25),
    ],
)
def test_speed_changes_tempo_not_pitch(fmt: str, speed: float) -> None:
    streamed, data = encode(fmt, sine(), speed=speed)
    assert streamed
    samples, rate, _ = decode(fmt, data)
    # atempo itself lands within ~0.5 % of the target; lossy codecs add their padding on top.
    assert len(samples) / rate == pytest.approx(SECONDS / speed, rel=0.02, abs=EXTRA[fmt][1] + 0.01)
    assert_is_the_sine(samples, rate)


def test_speed_one_bypasses_atempo() -> None:
    assert StreamEncoder("pcm")._tempo is None
    assert StreamEncoder("pcm", speed=1.5)._tempo is not None


def test_clipping_saturates() -> None:
    encoder = StreamEncoder("pcm")
    data = encoder.encode(np.array([1.5, -1.5, 1.0, -1.0, 0.0], np.float32)) + encoder.finish()
    assert np.frombuffer(data, "<i2").tolist() == [32767, -32767, 32767, -32767, 0]


@pytest.mark.parametrize("fmt", ["ogg", "MP3", "", "m4a"])
def test_unknown_format(fmt: str) -> None:
    with pytest.raises(ValueError, match="response_format"):
        StreamEncoder(fmt)


@pytest.mark.parametrize("speed", [0.0, 0.24, 4.01, -1.0, float("nan"), float("inf")])
def test_speed_out_of_range(speed: float) -> None:
    with pytest.raises(ValueError, match="speed"):
        StreamEncoder("mp3", speed=speed)
