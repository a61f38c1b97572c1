"""``POST /v1/audio/speech``: forward the request to a node and stream its audio back."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from dataclasses import dataclass

from starlette.requests import Request as HttpRequest
from starlette.types import Receive, Scope, Send

from tunnel.protocol import Audio, End, Error, ModelInfo, Request

from .bodies import read_body
from .config import RelayConfig
from .errors import ApiError
from .limits import ConcurrencyLimiter, retry_after
from .metrics import observation
from .router import Router
from .speech_request import CONTENT_TYPES, MAX_BODY_BYTES, SpeechRequest, parse_speech_request
from .tunnel_server import NodeGone, NodeSession, Stream

log = logging.getLogger("relay.speech")

_NODE_ERRORS = {  # node error code -> (HTTP status, OpenAI error code)
    "busy": (429, "node_busy"),
    "unknown_model": (404, "model_not_found"),
    "unknown_voice": (404, "voice_not_found"),
    "invalid_request": (400, "invalid_value"),
    "not_found": (404, "not_found"),
    "internal_error": (502, "node_error"),
}


async def create_speech(request: HttpRequest) -> SpeechResponse:
    client: str = request.state.client  # set by the API key check
    rate = request.app.state.rate_limiter
    wait = rate.take(client)
    if wait:
        raise ApiError(
            429,
            f"Rate limit reached: {rate.per_minute} speech requests a minute for this {_who(client)}; retry in {retry_after(wait)} s.",
            code="rate_limit_exceeded",
            retry_after=retry_after(wait),
        )
    body = await read_body(request, MAX_BODY_BYTES)
    speech = parse_speech_request(body)
    observation(request.scope).note_model(speech.model)
    return SpeechResponse(request.app.state.router, request.app.state.config, speech, client, request.app.state.open_requests)


def _who(client: str) -> str:
    return "API key" if client.startswith("key:") else "address"


@dataclass(frozen=True)
class Route:
    """Where a request may go: a node, its model, and the voice as that node names it."""

    node: NodeSession
    model: ModelInfo
    voice: str


def routes(router: Router, speech: SpeechRequest) -> list[Route]:
    """Every place the request could be served, least busy first (stream caps aside).

    The nodes whose model (by name or alias) has the voice; else, for a voice the nodes keep
    (uploaded, named by id or by name), the nodes that keep it, on the model that speaks kept
    voices: the one asked for where it does, so that ``tts-1`` or ``gpt-4o-mini-tts`` with an
    uploaded voice reaches a Base model. A kept voice's id wins over a model's voice of that name.
    """
    kept = router.kept_voices().get(speech.voice)
    if kept is None:
        direct = [
            Route(node, info, speech.voice) for node, info in router.serving(speech.model) if info.any_voice or speech.voice in info.voices
        ]
        if direct:
            return direct
        kept = router.kept_voice(speech.voice)
    if kept is None:
        return []
    voice, nodes = kept
    found = []
    for node in nodes:
        speakers = [info for info in node.models.values() if info.clones]
        asked = [info for info in speakers if speech.model == info.name or speech.model in info.aliases]
        found.append(Route(node, (asked or speakers)[0], voice.id))
    return found


async def open_stream(router: Router, config: RelayConfig, speech: SpeechRequest, request_id: str) -> tuple[Stream, Audio | End]:
    """Start the request on a node and wait for its first audio (or its immediate end).

    Nodes are tried least-busy first; a node that is busy or drops before sending anything is
    skipped, so the client only sees an error when no node could take the work.
    """
    _check_servable(router, config, speech)
    tried: set[NodeSession] = set()
    busy = False
    # Asked anew after every attempt, since nodes come, go and take work meanwhile; least busy
    # first, and none at RELAY_MAX_STREAMS_PER_NODE.
    while candidates := [r for r in _untried(router, speech, tried) if router.has_room(r.node)]:
        route = candidates[0]
        tried.add(route.node)
        outcome = await _attempt(route, config, speech, request_id)
        if isinstance(outcome, tuple):
            log.info("%s: streaming from node %s (%s)", request_id, route.node.name, route.model.name)
            return outcome
        if outcome is None:
            log.warning("%s: node %s left before answering; trying another", request_id, route.node.name)
        elif outcome.code == "busy":
            busy = True
        else:
            raise _node_refusal(outcome)
    if busy or _untried(router, speech, tried):  # the nodes left are at their stream cap
        raise ApiError(
            429, "Every node serving this model is at capacity; retry shortly.", code="node_busy", retry_after=config.retry_after_seconds
        )
    raise ApiError(502, "The node serving this model disconnected.", code="node_failed")


def _check_servable(router: Router, config: RelayConfig, speech: SpeechRequest) -> None:
    """Refuse what no connected node could serve, before trying any."""
    if router.draining:
        raise ApiError(503, "This relay is shutting down; retry shortly.", code="relay_draining", retry_after=config.retry_after_seconds)
    if not router.nodes:
        raise ApiError(
            503, "No node is connected to this relay right now.", code="no_node_available", retry_after=config.retry_after_seconds
        )
    if routes(router, speech):
        return
    if not router.serving(speech.model):
        raise ApiError(
            404, f"The model '{speech.model}' does not exist or no connected node serves it.", param="model", code="model_not_found"
        )
    raise ApiError(404, f"The voice '{speech.voice}' is not available for model '{speech.model}'.", param="voice", code="voice_not_found")


def _untried(router: Router, speech: SpeechRequest, tried: set[NodeSession]) -> list[Route]:
    return [route for route in routes(router, speech) if route.node not in tried]


async def _attempt(route: Route, config: RelayConfig, speech: SpeechRequest, request_id: str) -> tuple[Stream, Audio | End] | Error | None:
    """One try on one node: the stream and its first event, the node's error, or None if the node
    left before answering. Raises 504 if the first audio takes too long (the stream is closed)."""
    message = Request(
        id=route.node.new_stream_id(),
        request_id=request_id,
        model=route.model.name,
        voice=route.voice,
        input=speech.live.text if speech.live else speech.input,
        instructions=speech.instructions,
        response_format=speech.response_format,
        speed=speech.speed,
        live=speech.live is not None,
    )
    stream = None
    try:
        stream = await route.node.open_stream(message)
        if speech.live is not None:
            speech.live.attach(stream)
        first = await stream.next_event(config.first_audio_timeout)
    except NodeGone:
        return None
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:  # too slow, or the client hung up
        if stream is not None:
            await stream.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ApiError(504, "The node did not start producing audio in time.", code="node_timeout") from None
    return first if isinstance(first, Error) else (stream, first)


def _node_refusal(error: Error) -> ApiError:
    """What the client hears when the node refused the request (other than being busy)."""
    status, code = _NODE_ERRORS[error.code]
    param = {"unknown_voice": "voice", "unknown_model": "model"}.get(error.code)
    return ApiError(status, error.message or "The node could not serve this request.", code=code, param=param)


class ClientStalled(Exception):
    """The client stopped taking audio."""


class SpeechResponse:
    """An ASGI response that opens the node stream itself, so that a client who hangs up at any
    moment (even before the first byte) cancels the node's work."""

    def __init__(
        self, router: Router, config: RelayConfig, speech: SpeechRequest, client: str = "", open_requests: ConcurrencyLimiter | None = None
    ) -> None:
        self.router = router
        self.config = config
        self.speech = speech
        self.client = client  # "key:<name>" or "addr:<host>", for the per-key limits
        self.open_requests = open_requests if open_requests is not None else ConcurrencyLimiter(0)
        self.request_id = "req_" + secrets.token_hex(12)
        self.sse = speech.stream_format == "sse"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Counted here, where the request's whole life runs, so that every way out releases it.
        if not self.open_requests.acquire(self.client):
            limit = self.open_requests.limit
            error = ApiError(
                429,
                f"Too many requests open at once for this {_who(self.client)}: at most {limit}; retry when one ends.",
                code="too_many_concurrent_requests",
                retry_after=self.config.retry_after_seconds,
            )
            await self._answer_error(error, scope, send)
            return
        self.router.responses += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            self.router.responses -= 1
            self.open_requests.release(self.client)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._respond(scope, send))
        gone = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            log.info("%s: client went away", self.request_id)
            work.cancel()
        gone.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]

    async def _respond(self, scope: Scope, send: Send) -> None:
        self.observed = observation(scope)
        stream = None
        try:
            event: Audio | End | Error
            try:
                stream, event = await open_stream(self.router, self.config, self.speech, self.request_id)
            except ApiError as error:
                await self._answer_error(error, scope, send)
                return
            await send({"type": "http.response.start", "status": 200, "headers": self._headers()})
            while isinstance(event, Audio):
                await self._send_audio(send, event.data)
                await stream.consumed(len(event.data))
                event = await stream.next_event(self.config.stream_idle_timeout)
            if isinstance(event, End):
                await self._send_body(send, self._done(event), more=False)
                return
            log.warning("%s: node failed mid-stream: %s", self.request_id, event.message)
            await self._fail_mid_stream(send, ApiError(502, event.message or "The node failed.", code="node_error"))
        except NodeGone:
            log.warning("%s: node disconnected mid-stream", self.request_id)
            await self._fail_mid_stream(send, ApiError(502, "The node disconnected mid-stream.", code="node_failed"))
        except ClientStalled:
            log.warning("%s: the client took no audio for %.0f s; dropped", self.request_id, self.config.stream_idle_timeout)
        except asyncio.TimeoutError:
            log.warning("%s: node stalled mid-stream", self.request_id)
            await self._fail_mid_stream(send, ApiError(504, "The node stopped sending audio.", code="node_timeout"))
        finally:
            if stream is not None:
                await stream.close()

    async def _answer_error(self, error: ApiError, scope: Scope, send: Send) -> None:
        """Answer with ``error`` instead of audio, under this request's id."""
        log.info("%s: %d %s", self.request_id, error.status, error.code)
        response = error.response()
        response.headers["x-request-id"] = self.request_id
        await response(scope, _no_receive, send)

    async def _send_audio(self, send: Send, data: bytes) -> None:
        """Hand audio to the client; this waits while the client reads slowly, but not for ever: a
        client that takes nothing for the idle timeout would hold its node's slot indefinitely."""
        try:
            await asyncio.wait_for(self._send_body(send, self._audio(data)), self.config.stream_idle_timeout)
        except asyncio.TimeoutError:
            raise ClientStalled() from None
        self.observed.audio_sent(len(data))

    def _headers(self) -> list[tuple[bytes, bytes]]:
        media_type = "text/event-stream" if self.sse else CONTENT_TYPES[self.speech.response_format]
        return [
            (b"content-type", media_type.encode()),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", self.request_id.encode()),
        ]

    def _audio(self, data: bytes) -> bytes:
        if not self.sse:
            return data
        return _sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})

    def _done(self, end: End) -> bytes:
        if not self.sse:
            return b""
        usage = {"input_tokens": end.input_tokens, "output_tokens": end.output_tokens, "total_tokens": end.input_tokens + end.output_tokens}
        return _sse_event({"type": "speech.audio.done", "usage": usage})

    async def _fail_mid_stream(self, send: Send, error: ApiError) -> None:
        """Headers are gone, so the status can no longer change. SSE gets an error event; raw
        audio is cut off without the closing chunk, which HTTP clients report as a failed read."""
        self.observed.stream_failed(error.code)
        if self.sse:
            await self._send_body(send, _sse_event({"type": "error", **error.body()}), more=False)

    @staticmethod
    async def _send_body(send: Send, body: bytes, more: bool = True) -> None:
        await send({"type": "http.response.body", "body": body, "more_body": more})


def _sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _no_receive() -> dict:
    raise RuntimeError("an error response reads nothing")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
