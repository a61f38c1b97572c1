"""Uploaded recordings, decoded and checked before a node keeps them (local_node/serving/recordings.py)."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest

from local_node.serving.audio import StreamEncoder
from local_node.serving.recordings import MAX_SECONDS, UnusableRecording, decode_recording


def tone(seconds: float, rate: int = 24000, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (level * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat((samples * 32767).astype("<i2"), channels).tobytes())
    return buffer.getvalue()


def webm(samples: np.ndarray) -> bytes:
    """What a browser's MediaRecorder sends: Opus in WebM, 48 kHz."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = 24000
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        for resampled in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(resampled):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def encoded(response_format: str, samples: np.ndarray) -> bytes:
    encoder = StreamEncoder(response_format)
    return encoder.encode(samples) + encoder.finish()


@pytest.mark.parametrize(
    "name, data",
    [
        ("wav 16 kHz", wav(tone(3, 16000), 16000)),
        ("wav 48 kHz stereo", wav(tone(3, 48000), 48000, channels=2)),
        ("webm opus", webm(tone(3))),
        *[(f, encoded(f, tone(3))) for f in ("mp3", "opus", "aac", "flac", "wav")],
    ],
)
def test_common_formats_become_24_khz_mono_of_the_same_length(name, data):
    samples = decode_recording(data)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size / 24000 - 3.0) < 0.1, (name, samples.size)
    assert 0.2 < np.abs(samples).max() < 0.45  # a 0.3 tone (a stereo downmix adds up to 3 dB)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not audio"),
        (b"RIFF....WAVEfmt " + bytes(100), "not audio"),
        (b"just some text, not a recording at all" * 10, "not audio"),
        (wav(tone(3, level=0.0), 24000), "silent"),
        (wav(tone(3, level=0.0002), 24000), "silent"),
        (wav(tone(0.5), 24000), "too short"),
        (wav(tone(MAX_SECONDS + 2, 8000), 8000), "too long"),
        (encoded("mp3", tone(300, level=0.3)), "too long"),  # 5 minutes in a small file: not decoded whole
    ],
)
def test_what_cannot_be_used_is_refused_with_the_reason(data, reason):
    with pytest.raises(UnusableRecording, match=reason):
        decode_recording(data, "the sample")


def test_a_video_file_without_sound_is_not_audio():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=5)
        stream.width = stream.height = 16
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 40, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(UnusableRecording, match="no audio stream"):
        decode_recording(buffer.getvalue())
