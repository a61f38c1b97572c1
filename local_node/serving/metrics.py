"""The node's Prometheus metrics, and its opt-in ``/metrics`` listener (``metrics:`` in the YAML).

One registry per NodeMetrics (not prometheus_client's global one), so tests may hold several.
Label values come from the config only: model names, relay URLs, fixed outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Callable, Iterator

import prometheus_client
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from local_node.config import MetricsConfig
from tunnel.credentials import Credentials, bearer_token

log = logging.getLogger("local_node.metrics")

OUTCOMES = ("done", "cancelled", "error", "busy", "invalid")
# Seconds per generation step; 0.08 s is real time (one 12.5 Hz frame), so it is a bound.
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

# The *_created series double the output and say nothing a restart counter would not.
prometheus_client.disable_created_metrics()


class NodeMetrics:
    """Every metric of one node, in its own registry."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.frames = Counter(
            "node_frames_generated", "Codec frames generated (12.5 per second of audio), by model.", ["model"], registry=registry
        )
        self.step_seconds = Histogram(
            "node_frame_seconds",
            "Time per generation step (the codec decodes on its own thread); a step gives every "
            "utterance in the batch its next frame (under 0.08 s: faster than real time).",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge("node_queue_depth", "Requests admitted: generating plus waiting for a slot.", ["model"], registry=registry)
        self.queue_capacity = Gauge(
            "node_queue_capacity", "max_batch + max_queue: beyond this, requests are answered busy.", ["model"], registry=registry
        )
        self.requests = Counter(
            "node_requests",
            "Requests ended, by model and outcome: done, cancelled (the relay or the tunnel "
            "stopped it), error, busy (queue full), invalid (the engine refused it).",
            ["model", "outcome"],
            registry=registry,
        )
        self.text_waits = Counter(
            "node_live_text_waits",
            "Times a live utterance (text still being written) caught up with its text and waited for more, by model.",
            ["model"],
            registry=registry,
        )
        self.text_wait_seconds = Counter(
            "node_live_text_wait_seconds", "Seconds live utterances spent waiting for their text, by model.", ["model"], registry=registry
        )
        self.relay_connected = Gauge("node_relay_connected", "1 while the tunnel to this relay is open.", ["relay"], registry=registry)
        self.reconnects = Counter("node_reconnects", "Tunnels to this relay opened again after one closed.", ["relay"], registry=registry)
        ProcessCollector(registry=registry)

    def model(self, name: str, depth: Callable[[], int], capacity: int) -> ModelMetrics:
        """The metrics of one model; ``depth`` is read at scrape time."""
        self.queue_depth.labels(name).set_function(depth)
        self.queue_capacity.labels(name).set(capacity)
        return ModelMetrics(self, name)

    def link(self, relay: str) -> LinkMetrics:
        return LinkMetrics(self, relay)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) in the format the scraper asked for (Prometheus text or OpenMetrics)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class ModelMetrics:
    """One model's series, bound once: the batcher reports every step, from its own thread
    (prometheus_client's metrics are thread-safe)."""

    def __init__(self, metrics: NodeMetrics, model: str) -> None:
        self._frames = metrics.frames.labels(model)
        self._step_seconds = metrics.step_seconds.labels(model)
        self._requests = {outcome: metrics.requests.labels(model, outcome) for outcome in OUTCOMES}
        self._text_waits = metrics.text_waits.labels(model)
        self._text_wait_seconds = metrics.text_wait_seconds.labels(model)

    def step(self, frames: int, seconds: float) -> None:
        """A generation step gave ``frames`` frames (one per utterance in it) in ``seconds``."""
        if frames > 0:  # a step that produced nothing (everyone cancelled) says nothing about speed
            self._frames.inc(frames)
            self._step_seconds.observe(seconds)

    def finished(self, outcome: str) -> None:
        self._requests[outcome].inc()

    def text_wait(self, waits: int, seconds: float) -> None:
        """A live utterance ended having waited ``waits`` times, ``seconds`` in all, for its text."""
        self._text_waits.inc(waits)
        self._text_wait_seconds.inc(seconds)


class LinkMetrics:
    """The tunnel to one relay: up or down, and how often it came back."""

    def __init__(self, metrics: NodeMetrics, relay: str) -> None:
        self._connected = metrics.relay_connected.labels(relay)
        self._reconnects = metrics.reconnects.labels(relay)
        self._connected.set(0)  # present before the first connection, so an alert can see it down
        self._was_up = False

    def up(self) -> None:
        if self._was_up:
            self._reconnects.inc()
        self._was_up = True
        self._connected.set(1)

    def down(self) -> None:
        self._connected.set(0)


def metrics_app(metrics: NodeMetrics, token: str) -> Starlette:
    """``GET /metrics`` behind a bearer token, compared in constant time."""
    credentials = Credentials({"metrics": token})

    async def endpoint(request: Request) -> Response:
        if credentials.match(bearer_token(request.headers.get("authorization"))) is None:
            return PlainTextResponse("metrics token missing or wrong\n", 401, headers={"WWW-Authenticate": "Bearer"})
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    return Starlette(routes=[Route("/metrics", endpoint, methods=["GET"])])


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The node's own handlers drain it (serve_relays); this server must not take SIGTERM from them.
        yield


class MetricsListener:
    """Serves ``/metrics`` from the node's event loop while the node runs.

    The socket is bound at construction, before the models load, so a taken port stops the node
    at once with a clear message instead of after minutes of loading.
    """

    def __init__(self, metrics: NodeMetrics, config: MetricsConfig) -> None:
        family, kind, proto, _, address = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0]
        self.socket = socket.socket(family, kind, proto)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
        except OSError:
            self.socket.close()
            raise
        self.url = f"http://{config.host}:{self.socket.getsockname()[1]}/metrics"
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start-up chatter; ours is below
        self._server = _Server(
            uvicorn.Config(
                metrics_app(metrics, config.token),
                log_config=None,
                access_log=False,
                lifespan="off",
                ws="none",
                timeout_graceful_shutdown=1,
            )
        )
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> MetricsListener:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():  # it failed to start; say why
            self._task.result()
        log.info("metrics on %s", self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
