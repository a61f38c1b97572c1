"""What the node asks of a speech engine: a job in, 24 kHz PCM out, and the errors between."""

from __future__ import annotations

import re
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
    text: str  # all of it; or, with a feed, the first of it
    voice: str
    instructions: str | None = None
    feed: TextFeed | None = None  # the text is still being written: the rest arrives here


# Where written text may be cut without changing its tokens: before a run of whitespace (a word
# starts after it), or after sentence and clause punctuation of scripts that use no spaces.
_BOUNDARY = re.compile(r"(?<=\S)(?=\s)|(?<=[。！？，；、：])")
_WORD = re.compile(r"\w+|[^\w\s]")


class TextFeed:
    """The text of a request still being written: the tunnel ``put``s each piece as it arrives and
    ``finish``es it; the engine ``take``s it in pieces cut where words begin, so that each piece
    tokenizes as it would within the whole text. Thread-safe."""

    POLL = 0.05  # seconds: how often a waiting ``take`` checks for a cancel

    def __init__(self, first: str = "") -> None:
        self._text = first
        self._taken = 0
        self.finished = False
        self._changed = threading.Condition()

    @property
    def text(self) -> str:
        """All of the text so far."""
        return self._text

    def put(self, text: str) -> None:
        with self._changed:
            if self.finished:
                raise ValueError("the text was finished")
            self._text += text
            self._changed.notify_all()

    def finish(self) -> None:
        with self._changed:
            self.finished = True
            self._changed.notify_all()

    def take(self, min_words: int, cancelled: threading.Event) -> str | None:
        """The next piece, from what was taken up to the last place a word begins, once it holds
        ``min_words`` words (any length once the text is finished); None when everything is taken
        and the text finished, or on a cancel. Blocks until then."""
        with self._changed:
            while not cancelled.is_set():
                rest = self._text[self._taken :]
                cut = len(rest) if self.finished else max((m.start() for m in _BOUNDARY.finditer(rest)), default=0)
                if cut and (self.finished or len(_WORD.findall(rest[:cut])) >= min_words):
                    self._taken += cut
                    return rest[:cut]
                if self.finished:
                    return None
                self._changed.wait(self.POLL)
            return None


class Engine(Protocol):
    info: ModelInfo
    concurrency: int  # syntheses it can have in progress at once
    # Called with the frames and seconds of each generation step; set by the worker (metrics).
    on_step: Callable[[int, float], None]
    # Called after a live utterance with how often, and for how many seconds, it waited for text.
    on_text_wait: Callable[[int, float], None]

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
