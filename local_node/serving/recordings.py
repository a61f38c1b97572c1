"""Uploaded recordings (a voice's sample, a consent) decoded and checked before anything is kept.

Any container and codec FFmpeg reads (wav, mp3, ogg/opus, flac, aac, webm, mp4...) becomes 24 kHz
mono float32, the rate the models' speaker encoder and codec take. What cannot be used is refused
with a message that says why: not audio, too short, too long, or silent.
"""

from __future__ import annotations

import io

import av
import numpy as np

from local_node.engine.base import SAMPLE_RATE

MIN_SECONDS = 1.0
MAX_SECONDS = 60.0
# Below this RMS (about -60 dBFS) the recording holds nothing a speaker encoder can use.
SILENCE_RMS = 1e-3


class UnusableRecording(ValueError):
    """The upload cannot be used; the message says why, for the person who sent it."""


def decode_recording(data: bytes, what: str = "the recording") -> np.ndarray:
    """``data`` as 24 kHz mono float32 samples, or UnusableRecording. Decoding stops just past
    MAX_SECONDS, so a small file that expands to hours costs no more than a long one."""
    limit = int((MAX_SECONDS + 1) * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    decoded = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise UnusableRecording(f"{what} holds no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    decoded += chunks[-1].size
                if decoded > limit:
                    break
            else:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
    except UnusableRecording:
        raise
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise UnusableRecording(f"{what} is not audio FFmpeg can read ({type(exc).__name__})") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    seconds = samples.size / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise UnusableRecording(f"{what} is too short: {seconds:.1f} s; it takes {MIN_SECONDS:.0f} to {MAX_SECONDS:.0f} s")
    if seconds > MAX_SECONDS:
        raise UnusableRecording(f"{what} is too long: over {MAX_SECONDS:.0f} s; it takes {MIN_SECONDS:.0f} to {MAX_SECONDS:.0f} s")
    if not np.isfinite(samples).all() or float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) < SILENCE_RMS:
        raise UnusableRecording(f"{what} is silent")
    return samples
