"""A synthetic engine for measuring the relay and the tunnel without a model in the way."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

import numpy as np

from local_node.config import ModelConfig
from local_node.engine.base import SAMPLE_RATE, SAMPLES_PER_FRAME, Cancelled, Job, JobError
from tunnel.protocol import ModelInfo


def synthetic_frames(text: str) -> Iterator[np.ndarray]:
    """What the synthetic engine says for ``text``: an 80 ms frame per character of a steady tone
    whose pitch (200 to 580 Hz) follows from the text, so that a test can tell whose audio it got."""
    frequency = 200 + 20 * (sum(map(ord, text)) % 20)
    t = np.arange(SAMPLES_PER_FRAME) / SAMPLE_RATE
    for i in range(len(text)):
        yield (0.3 * np.sin(2 * np.pi * frequency * (t + i * SAMPLES_PER_FRAME / SAMPLE_RATE))).astype(np.float32)


class SyntheticEngine:
    """A tone (``synthetic_frames``), one 80 ms frame per input character, at real-time pace.

    It loads nothing and sounds like nothing, which is the point: tests and load benchmarks use it
    to measure the relay and tunnel without a model in the way.
    """

    frame_seconds = SAMPLES_PER_FRAME / SAMPLE_RATE

    def __init__(self, config: ModelConfig) -> None:
        voices = tuple(v.name for v in config.voices) or ("tone",)
        self.info = ModelInfo(config.name, config.aliases, voices, any_voice=False)
        # No shared weights, so every synthesis can have a thread of its own: max_batch streams at
        # once, as many as a load test needs from one node.
        self.concurrency = config.max_batch
        self.on_step: Callable[[int, float], None] = lambda frames, seconds: None
        self.on_text_wait: Callable[[int, float], None] = lambda waits, seconds: None

    def check(self, job: Job) -> None:
        if job.voice not in self.info.voices:
            raise JobError("unknown_voice", f"voice {job.voice!r} is not one of {', '.join(self.info.voices)}")

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def synthesize(self, job: Job, cancelled: threading.Event) -> Iterator[np.ndarray]:
        if job.feed is None:
            yield from self._speak(job.text, cancelled)
            return
        while (piece := job.feed.take(1, cancelled)) is not None:  # live text: each piece as it comes
            yield from self._speak(piece, cancelled)
        if cancelled.is_set():
            raise Cancelled()

    def _speak(self, text: str, cancelled: threading.Event) -> Iterator[np.ndarray]:
        start = last = time.monotonic()
        for i, frame in enumerate(synthetic_frames(text)):
            if cancelled.is_set():
                raise Cancelled()
            self.on_step(1, time.monotonic() - last)  # one frame, paced like a real-time model
            last = time.monotonic()
            yield frame
            time.sleep(max(0.0, start + (i + 1) * self.frame_seconds - time.monotonic()))
