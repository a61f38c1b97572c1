"""Runs one model's syntheses off the event loop: up to the engine's concurrency at once (a
QwenEngine's are generated together by its batcher), a bounded queue behind them."""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

from local_node.engine.base import SAMPLES_PER_FRAME, Cancelled, Engine, Job, JobError, TextFeed
from local_node.serving.audio import StreamEncoder
from local_node.serving.metrics import NodeMetrics
from tunnel.protocol import Request

_DONE = object()


class Busy(Exception):
    """The model is running and its queue is full."""


class ModelWorker:
    def __init__(self, engine: Engine, max_queue: int, metrics: NodeMetrics | None = None) -> None:
        self.engine = engine
        self.capacity = engine.concurrency + max_queue
        self.admitted = 0
        self.metrics = (metrics or NodeMetrics()).model(engine.info.name, lambda: self.admitted, self.capacity)
        engine.on_step = self.metrics.step  # set after warm-up: only served frames count
        engine.on_text_wait = self.metrics.text_wait
        # A thread per synthesis in progress; beyond that they wait here, in arrival order.
        self._thread = ThreadPoolExecutor(max_workers=engine.concurrency, thread_name_prefix=f"synth-{engine.info.name}")

    async def run(
        self, request: Request, cancelled: threading.Event, emit: Callable[[bytes], Awaitable[None]], feed: TextFeed | None = None
    ) -> tuple[int, int]:
        """Synthesise ``request``, passing encoded audio to ``emit`` as it is produced; a live
        request's text goes on arriving in ``feed``.

        Returns (input tokens, output codec frames). Raises JobError, Busy, or whatever the
        engine raised. Setting ``cancelled`` ends it early, without error.
        """
        job = Job(request.input, request.voice, request.instructions, feed=feed)
        try:
            self.engine.check(job)
        except JobError:
            self.metrics.finished("invalid")
            raise
        if self.admitted >= self.capacity:
            self.metrics.finished("busy")
            raise Busy()
        self.admitted += 1
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item)  # noqa: E731
        produced = loop.run_in_executor(self._thread, self._produce, job, request, cancelled, put)
        outcome = "cancelled"  # unless it reaches its end, or the engine fails
        try:
            while (chunk := await chunks.get()) is not _DONE:
                if not cancelled.is_set():
                    await emit(chunk)
            if not cancelled.is_set():
                outcome = "done"
        finally:
            cancelled.set()  # if we leave early (the tunnel broke), the thread stops too
            try:
                input_tokens, samples = await produced
            except Exception:
                outcome = "error"
                raise
            finally:
                self.admitted -= 1
                self.metrics.finished(outcome)
        return input_tokens, math.ceil(samples / SAMPLES_PER_FRAME)

    def _produce(self, job: Job, request: Request, cancelled: threading.Event, put: Callable) -> tuple[int, int]:
        """On the model's thread: synthesise and encode. Returns (input tokens, samples)."""
        # The tokenizer is not safe to share across threads, so tokens are counted here too (at the
        # end for live text, when all of it is there).
        tokens = self.engine.count_tokens(job.text) if job.feed is None else 0
        samples = 0
        try:
            if cancelled.is_set():  # cancelled while it waited in the queue
                return tokens, 0
            encoder = StreamEncoder(request.response_format, request.speed)
            try:
                for pcm in self.engine.synthesize(job, cancelled):
                    samples += len(pcm)
                    if data := encoder.encode(pcm):
                        put(data)
            except Cancelled:
                return tokens, samples  # nobody is listening for the rest
            if data := encoder.finish():
                put(data)
            if job.feed is not None:
                tokens = self.engine.count_tokens(job.feed.text)
            return tokens, samples
        finally:
            put(_DONE)
