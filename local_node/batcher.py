"""One model's generation thread: every utterance in progress gets its frames from one FrameBatch.

Each synthesis runs on its own worker thread and hands the batcher its prompt and what to do with
each frame (the codec decoder's ``push``) and at the end (``flush``); the batcher's thread steps
the batch as long as anyone is in it, and utterances join and leave between frames. A newcomer
starts with the next step instead of after everyone already running, and when the weights'
kernel gains from several rows (int8 weights do on AVX2: see BENCHMARKS.md), the streams share
each read of the weights.

All of a model's torch work (generation and codec decoding) stays on this one thread: torch runs
each op on all cores, so two threads doing so at once would only fight over them. The worker
threads encode (PyAV) and send. What the callbacks return is queued per utterance without bound;
an utterance has a frame budget, and it is PCM on its way out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .generation import FrameBatch, Prompt, SamplingConfig, Utterance

log = logging.getLogger("local_node.batcher")

_END = object()


@dataclass(eq=False)
class _Request:
    prompt: Prompt
    sampling: SamplingConfig
    cancelled: threading.Event
    on_frame: Callable[[torch.Tensor], Any]
    on_end: Callable[[], Any]
    results: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


class Batcher:
    def __init__(self, model: Any, rows: int, name: str = "model") -> None:
        self._batch = FrameBatch(model, rows)
        self._joining: list[_Request] = []
        self._live: dict[Utterance, _Request] = {}
        self._wake = threading.Condition()
        # Told the frames and seconds of each step (codec work included), on this thread: metrics.
        self.on_step: Callable[[int, float], None] = lambda frames, seconds: None
        threading.Thread(target=self._run, name=f"generate-{name}", daemon=True).start()

    def run(self, prompt: Prompt, sampling: SamplingConfig, cancelled: threading.Event,
            on_frame: Callable[[torch.Tensor], Any], on_end: Callable[[], Any]) -> Iterator[Any]:
        """Generate the utterance; on the batcher's thread call ``on_frame(codes)`` for each
        frame and ``on_end()`` after the last, and yield here whatever they return that is not
        None. Once ``cancelled`` is set the batch drops it before its next frame (``on_end`` is
        not called) and this ends."""
        request = _Request(prompt, sampling, cancelled, on_frame, on_end)
        with self._wake:
            self._joining.append(request)
            self._wake.notify()
        while (item := request.results.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._joining or self._live):
                    self._wake.wait()
                self._admit()
            started = time.monotonic()
            try:
                with torch.inference_mode():
                    produced = self._batch.step()
            except Exception as exc:  # the model failed: everyone in the batch hears it, the thread goes on
                log.exception("generation step failed")
                for utterance in list(self._live):
                    self._leave(utterance, exc)
                continue
            for utterance, codes in produced.items():
                self._deliver(utterance, self._live[utterance].on_frame, codes)
            for utterance in [u for u in self._live if u.done]:
                self._deliver(utterance, self._live[utterance].on_end)
                if utterance in self._live:
                    self._leave(utterance)
            self.on_step(len(produced), time.monotonic() - started)

    def _deliver(self, utterance: Utterance, callback: Callable, *args: Any) -> None:
        """Run one utterance's callback; its failure ends that utterance only."""
        try:
            with torch.inference_mode():
                result = callback(*args)
        except Exception as exc:
            self._leave(utterance, exc)
            return
        if result is not None:
            self._live[utterance].results.put(result)

    def _admit(self) -> None:
        """Between steps: drop cancelled utterances, let newcomers in while rows are free."""
        for utterance, request in list(self._live.items()):
            if request.cancelled.is_set():
                self._leave(utterance)
        for request in [r for r in self._joining if r.cancelled.is_set()]:
            self._joining.remove(request)
            request.results.put(_END)
        while self._joining and self._batch.free_rows:
            request = self._joining.pop(0)
            self._live[self._batch.add(request.prompt, request.sampling)] = request

    def _leave(self, utterance: Utterance, error: Exception | None = None) -> None:
        self._batch.remove(utterance)
        self._live.pop(utterance).results.put(_END if error is None else _Failed(error))


@dataclass
class _Failed:
    error: Exception
