"""One model's two threads: one generates the frames of every utterance in progress (one
FrameBatch), the other decodes them to audio.

Each synthesis runs on its own worker thread and hands the batcher its prompt and what to do with
each frame (the codec decoder's ``push``) and at the end (``flush``). The generation thread steps
the batch as long as anyone is in it; utterances join and leave between frames, so a newcomer
starts with the next step instead of after everyone already running, and the streams share each
read of the weights. Each step's codes go to the decoding thread, which runs the callbacks in
order and queues what they return for the worker thread to encode (PyAV) and send.

Why two threads: generation is bound by memory bandwidth (a frame reads every talker weight once
and the code predictor's 16 times) and one core takes most of it, while decoding is bound by
arithmetic. On a 2-core
machine, one torch thread each on its own core overlaps the two, where two torch threads for one
sequential loop left a core idle at every small op and stalled at every product whenever anything
else (the encoder, the event loop) ran. ``threads`` is each thread's torch thread count. The
products of cpu_kernels.c also use the decoding thread's cores, but only while it is idle: it
reserves them for each piece of work (``Kernels.reserved``).

What the callbacks return is queued per utterance without bound; an utterance has a frame
budget, and it is PCM on its way out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from local_node.model.generation import FrameBatch, Prompt, SamplingConfig, Utterance

log = logging.getLogger("local_node.batcher")

_END = object()  # on a request's results: nothing more will come
WAIT_POLL = 0.05  # seconds: how often cancels are noticed while every utterance waits for text


# What the generation thread hands the decoding thread for one request, in order.
@dataclass(frozen=True)
class _Frame:
    codes: torch.Tensor  # one frame's 16 codes: decode it


@dataclass(frozen=True)
class _Flush:
    """The utterance is complete: decode what is left, then end."""


@dataclass(frozen=True)
class _Stop:
    """Cancelled: end without decoding the rest."""


@dataclass(frozen=True)
class _Failed:
    """The model failed, or a callback did: the request ends with this error."""

    error: Exception


_Item = _Frame | _Flush | _Stop | _Failed


@dataclass(eq=False)
class _Request:
    prompt: Prompt
    sampling: SamplingConfig
    cancelled: threading.Event
    on_frame: Callable[[torch.Tensor], Any]
    on_end: Callable[[], Any]
    results: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    failed: bool = False


class Batcher:
    def __init__(self, model: Any, rows: int, name: str = "model", threads: int = 1) -> None:
        self._batch = FrameBatch(model, rows)
        self._joining: list[_Request] = []
        self._live: dict[Utterance, _Request] = {}
        self._wake = threading.Condition()
        self._decoding: queue.SimpleQueue[tuple[_Request, _Item]] = queue.SimpleQueue()
        self.threads = threads
        # Told the frames and seconds of each generation step, on that thread: metrics.
        self.on_step: Callable[[int, float], None] = lambda frames, seconds: None
        threading.Thread(target=self._generate, name=f"generate-{name}", daemon=True).start()
        threading.Thread(target=self._decode, name=f"decode-{name}", daemon=True).start()

    def run(
        self,
        prompt: Prompt,
        sampling: SamplingConfig,
        cancelled: threading.Event,
        on_frame: Callable[[torch.Tensor], Any],
        on_end: Callable[[], Any],
    ) -> Iterator[Any]:
        """Generate the utterance; on the decoding thread call ``on_frame(codes)`` for each frame
        and ``on_end()`` after the last, and yield here whatever they return that is not None.
        Once ``cancelled`` is set the batch drops it before its next frame (``on_end`` is not
        called) and this ends."""
        request = _Request(prompt, sampling, cancelled, on_frame, on_end)
        if prompt.live is not None:  # text arriving may let a waiting utterance step again
            prompt.live.listeners.append(self._notify)
        with self._wake:
            self._joining.append(request)
            self._wake.notify()
        while (item := request.results.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _generate(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not (self._joining or self._live):
                    self._wake.wait()
                self._admit()
                if self._batch.waiting and not self._joining:
                    # Everyone waits for text: sleep until some arrives (or a cancel, checked
                    # at least every WAIT_POLL seconds, since cancelling sets an event only).
                    self._wake.wait(WAIT_POLL)
                    continue
            started = time.monotonic()
            try:
                with torch.inference_mode():
                    produced = self._batch.step()
            except Exception as exc:  # the model failed: everyone in the batch hears it, the thread goes on
                log.exception("generation step failed")
                for utterance in list(self._live):
                    self._leave(utterance, _Failed(exc))
                continue
            for utterance, codes in produced.items():
                self._decoding.put((self._live[utterance], _Frame(codes)))
            for utterance in [u for u in self._live if u.done]:
                self._leave(utterance, _Flush())
            self.on_step(len(produced), time.monotonic() - started)

    def _admit(self) -> None:
        """Between steps: drop cancelled utterances, let newcomers in while rows are free."""
        for utterance, request in list(self._live.items()):
            if request.cancelled.is_set():
                self._leave(utterance, _Stop())
        for request in [r for r in self._joining if r.cancelled.is_set()]:
            self._joining.remove(request)
            request.results.put(_END)
        while self._joining and self._batch.free_rows:
            request = self._joining.pop(0)
            self._live[self._batch.add(request.prompt, request.sampling)] = request

    def _leave(self, utterance: Utterance, how: _Item) -> None:
        self._batch.remove(utterance)
        self._decoding.put((self._live.pop(utterance), how))

    def _idle(self) -> bool:
        """Whether generation has nothing to do: no utterance live or waiting to join. Asked from
        the decoding thread, so under the generation thread's lock."""
        with self._wake:
            return not (self._live or self._joining)

    def _decode(self) -> None:
        """Run each request's callbacks in order; a failing one ends that request only (the
        generation thread drops it before its next frame)."""
        torch.set_num_threads(self.threads)
        while True:
            request, item = self._decoding.get()
            if request.failed:
                continue
            match item:
                case _Stop():
                    request.results.put(_END)
                    continue
                case _Failed():
                    request.results.put(item)
                    continue
                case _Frame(codes):
                    work: Callable[[], Any] = functools.partial(request.on_frame, codes)
                case _Flush():
                    work = request.on_end
            # An utterance's last chunk, with nothing left to generate: generation's cores are
            # idle, so it decodes on those too (the end of the audio comes sooner). Only then:
            # set_num_threads also clears oneDNN's cache of kernels.
            idle = isinstance(item, _Flush) and self._idle()
            threads = self.threads * (2 if idle else 1)
            if idle:
                torch.set_num_threads(threads)
            kernels = self._batch.kernels
            try:
                with torch.inference_mode(), kernels.reserved(threads) if kernels else contextlib.nullcontext():
                    result = work()
            except Exception as exc:
                request.failed = True
                request.cancelled.set()
                request.results.put(_Failed(exc))
                continue
            finally:
                if idle:
                    torch.set_num_threads(self.threads)
            if result is not None:
                request.results.put(result)
            if isinstance(item, _Flush):
                request.results.put(_END)
