"""What the node asks of a speech engine: a job in, 24 kHz PCM out, and the errors between."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from tunnel.protocol import ModelInfo

SAMPLE_RATE = 24000  # Hz: what every Qwen3-TTS 12Hz model speaks
SAMPLES_PER_FRAME = 1920  # one 12.5 Hz codec frame: 80 ms at 24 kHz


class JobError(Exception):
    """A request this engine cannot serve; ``code`` is one of the tunnel protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Cancelled(Exception):
    """The client went away; generation stopped early."""


class ModelUnavailable(Exception):
    """The weights could not be loaded; the message says why and how to fix it."""


@dataclass(frozen=True)
class Job:
    text: str
    voice: str
    instructions: str | None = None


class Engine(Protocol):
    info: ModelInfo
    concurrency: int  # syntheses it can have in progress at once
    # Called with the frames and seconds of each generation step; set by the worker (metrics).
    on_step: Callable[[int, float], None]

    def check(self, job: Job) -> None:
        """Raise JobError if ``job`` cannot be served (unknown voice, missing description...)."""

    def count_tokens(self, text: str) -> int:
        """Input tokens, as reported in the usage of a response. Called on the worker thread."""

    def synthesize(self, job: Job, cancelled: threading.Event) -> Iterator[np.ndarray]:
        """Yield 24 kHz mono float32 PCM as it is produced. Runs in a worker thread; stops soon
        after ``cancelled`` is set."""


class Cloner(Protocol):
    """An engine that speaks the voices the node keeps (``info.clones``: a Base model)."""

    source: str  # the weights its clone prompts are made for

    def clone_prompt(self, sample: np.ndarray, ref_text: str | None) -> dict[str, Any]:
        """The clone prompt of a 24 kHz mono sample (with the words it speaks, if known), as
        tensors and plain values that ``torch.save`` keeps. Called on a worker thread."""

    def keep_voice(self, voice_id: str, prompt: dict[str, Any], language: str | None) -> None:
        """Speak ``voice_id`` from now on."""

    def drop_voice(self, voice_id: str) -> None:
        """Stop speaking ``voice_id``."""
