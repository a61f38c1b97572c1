"""The relay's Prometheus metrics and ``GET /metrics``.

Each app has its own registry (not prometheus_client's global one), so one process may hold
several apps, as tests do. Label values stay bounded whatever clients send: models are names
that nodes announced ("-" for anything else), statuses are HTTP codes, nodes are the names of
configured node tokens, doors are fixed.

Speech requests are observed by an ASGI middleware rather than inside the handlers, so that every
answer counts with its real status, including the ones raised before any node is involved (400,
401, 413, 429, 503...) and those made by exception handlers. The handlers only add what the
middleware cannot see: the model asked for, the audio bytes, a stream cut after its 200.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunnel.credentials import bearer_token

from .errors import ApiError

if TYPE_CHECKING:
    from .router import Router
    from .tunnel_server import NodeSession

SPEECH_PATH = "/v1/audio/speech"
METRICS_PATH = "/metrics"
UNKNOWN_MODEL = "-"
CLIENT_GONE = 499  # nginx's "client closed request": the client left before any status was sent
DOORS = ("api", "tunnel", "metrics")
# From a few ms (a synthetic engine, a warm node) to a minute (a long queue on a slow CPU).
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
# A whole response: up to 4096 characters, i.e. minutes of audio made at about real time.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
_SCOPE_KEY = "relay.observation"

# The *_created series double the output and say nothing a restart counter would not.
prometheus_client.disable_created_metrics()


class RelayMetrics:
    """Every metric of one relay app, in its own registry."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "relay_requests",
            "Speech requests answered, by model and HTTP status (499: the client left before any).",
            ["model", "status"],
            registry=registry,
        )
        self.first_byte = Histogram(
            "relay_time_to_first_byte_seconds",
            "From a speech request's arrival to its first audio byte sent.",
            buckets=FIRST_BYTE_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "relay_request_duration_seconds",
            "Speech requests that streamed audio (status 200): arrival to last byte.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.bytes_sent = Counter("relay_bytes_sent", "Audio bytes handed to clients (before SSE's base64).", registry=registry)
        self.stream_failures = Counter(
            "relay_stream_failures",
            "Streams cut after their audio began (their status was already 200), by error code.",
            ["model", "code"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "relay_auth_failures", "Credentials refused: api (API keys), tunnel (node tokens), metrics.", ["door"], registry=registry
        )
        self.node_connections = Counter(
            "relay_node_connections", "Tunnels accepted, by node token name; beyond the first, reconnections.", ["node"], registry=registry
        )
        self.live_sessions = Gauge("relay_live_sessions_open", "Live text sessions open (/v1/audio/speech/stream).", registry=registry)
        self.live_first_audio = Histogram(
            "relay_live_first_audio_seconds",
            "Live text sessions: from an utterance's first text to its first audio byte sent.",
            buckets=FIRST_BYTE_BUCKETS,
            registry=registry,
        )
        tasks = Gauge("relay_asyncio_tasks", "asyncio tasks alive in the relay; a steady climb is a leak.", registry=registry)
        tasks.set_function(_task_count)
        ProcessCollector(registry=registry)
        for door in DOORS:  # present at 0 from the start, so rate() sees the first failure
            self.auth_failures.labels(door)
        self._sessions: set[NodeSession] = set()
        registry.register(_NodeCollector(self._sessions))

    def node_connected(self, session: NodeSession) -> None:
        """A tunnel was accepted (call once per session, before its hello)."""
        self._sessions.add(session)
        self.node_connections.labels(session.name).inc()

    def node_left(self, session: NodeSession) -> None:
        self._sessions.discard(session)

    def auth_failure(self, door: str) -> None:
        self.auth_failures.labels(door).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """Call it on the event loop, so the task count is this loop's."""
        return exposition(self.registry, accept)


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """(body, content type): ``registry`` in the format the scraper asked for (Prometheus text or
    OpenMetrics)."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


class _NodeCollector:
    """Connected nodes and their open streams, read from the live sessions at scrape time: a node
    that leaves takes its series with it, and nothing has to be kept in step by hand."""

    def __init__(self, sessions: set[NodeSession]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("relay_nodes_connected", "Node tunnels open now.", value=len(self._sessions))
        in_flight = GaugeMetricFamily("relay_node_streams_in_flight", "Streams open on each node, by node token name.", labels=["node"])
        per_node: dict[str, int] = {}
        for session in self._sessions:  # two nodes may share a token, hence a name
            per_node[session.name] = per_node.get(session.name, 0) + session.outstanding
        for name, count in sorted(per_node.items()):
            in_flight.add_metric([name], count)
        yield in_flight


def _task_count() -> float:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped off the loop: there is nothing to count
        return 0


def model_label(router: Router, requested: str) -> str:
    """The announced name behind ``requested`` (a name or an alias), or "-": clients choose what
    they send, so only what nodes announced may become a label value."""
    for info in router.catalogue().values():
        if requested == info.name or requested in info.aliases:
            return info.name
    return UNKNOWN_MODEL


class Observation:
    """One speech request as the metrics see it; the middleware puts it in the ASGI scope."""

    def __init__(self, metrics: RelayMetrics | None, router: Router | None) -> None:
        self._metrics = metrics
        self._router = router
        self.model = UNKNOWN_MODEL
        self.started = time.monotonic()

    def note_model(self, requested: str) -> None:
        """Resolved now: by the end of the request the node may be gone, and its names with it."""
        if self._router is not None:
            self.model = model_label(self._router, requested)

    def audio_sent(self, size: int) -> None:
        if self._metrics is not None:
            self._metrics.bytes_sent.inc(size)

    def stream_failed(self, code: str | None) -> None:
        if self._metrics is not None:
            self._metrics.stream_failures.labels(self.model, code or "unknown").inc()


def observation(scope: Scope) -> Observation:
    """The request's Observation; a detached one (recording nothing) if no middleware made it."""
    return scope.get(_SCOPE_KEY) or Observation(None, None)


class ObserveRequests:
    """ASGI middleware: status, time to first byte and duration of speech requests; every 401."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        metrics: RelayMetrics = state.metrics
        path = scope["path"]
        observed = None
        if path == SPEECH_PATH:
            observed = scope[_SCOPE_KEY] = Observation(metrics, state.router)
        status: int | None = None
        first_byte = False

        async def watched(message: Message) -> None:
            nonlocal status, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 401:
                    metrics.auth_failure("metrics" if path == METRICS_PATH else "api")
            elif observed is not None and status == 200 and not first_byte and message.get("body"):
                first_byte = True
                metrics.first_byte.observe(time.monotonic() - observed.started)
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            status = status or 500  # the outermost middleware answers it
            raise
        finally:
            if observed is not None:
                final = status if status is not None else CLIENT_GONE
                metrics.requests.labels(observed.model, str(final)).inc()
                if final == 200:
                    metrics.duration.observe(time.monotonic() - observed.started)


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``, behind ``RELAY_METRICS_TOKEN``; without one it does not exist."""
    token = request.app.state.config.metrics_token
    if not token:
        raise HTTPException(404)  # the same answer as any unknown path
    if token.match(bearer_token(request.headers.get("authorization"))) is None:
        raise ApiError(
            401,
            "Missing or wrong metrics token: send RELAY_METRICS_TOKEN as 'Authorization: Bearer <token>'.",
            code="invalid_metrics_token",
        )
    body, content_type = request.app.state.metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
