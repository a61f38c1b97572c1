"""The relay's end of the tunnel: the websocket endpoint nodes dial into, one session per node."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from tunnel import protocol
from tunnel.handshake import parse_tunnel_authorization
from tunnel.protocol import (
    MAX_AUDIO_PAYLOAD,
    Audio,
    Body,
    Call,
    Cancel,
    Connection,
    Consent,
    ConsentList,
    Credit,
    Done,
    Draining,
    End,
    Error,
    Hello,
    KeptVoice,
    ModelInfo,
    ProtocolError,
    Request,
    Text,
    VoiceList,
)

from .limits import retry_after

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger("relay.tunnel")

HELLO_TIMEOUT = 30.0
CLOSE_PROTOCOL_ERROR = 1002


class NodeGone(Exception):
    """The node's connection closed while a stream was open."""


class Stream:
    """One request as the relay sees it: the events its node sends, in order.

    The queue needs no bound of its own: the protocol lets the node send no more audio than the
    credit this stream was granted, and credit comes back only as the client takes the audio.
    """

    def __init__(self, session: NodeSession, stream_id: int) -> None:
        self.session = session
        self.id = stream_id
        self._events: asyncio.Queue[Audio | End | Error | NodeGone] = asyncio.Queue()
        self.finished = False

    def deliver(self, event: Audio | End | Error | NodeGone) -> None:
        self._events.put_nowait(event)

    async def next_event(self, timeout: float) -> Audio | End | Error:
        """Wait for the next event; raises NodeGone, or TimeoutError when the node stays silent."""
        event = await asyncio.wait_for(self._events.get(), timeout)
        if isinstance(event, NodeGone):
            self.finished = True
            raise event
        if isinstance(event, (End, Error)):
            self.finished = True
        return event

    async def more_text(self, text: str, done: bool) -> None:
        """More of a live request's text (MAX_INPUT_CHARS at most per call)."""
        if not self.finished:
            await self.session.send_text(Text(self.id, text, done))

    async def consumed(self, size: int) -> None:
        """The client took ``size`` bytes of audio: the node may send that much more."""
        await self.session.grant(self.id, size)

    async def close(self) -> None:
        """Release the stream; tell the node to stop if it is still producing."""
        if not self.finished:
            self.finished = True
            await self.session.cancel(self)


class _PendingCall:
    """A call sent to the node, waiting for credit to send its upload and for the node's answer."""

    def __init__(self) -> None:
        self.credited = asyncio.Event()
        self.answer: asyncio.Future[Done | Error] = asyncio.get_running_loop().create_future()


class NodeSession:
    """A connected, authenticated node."""

    def __init__(self, websocket: WebSocket, name: str, send_timeout: float = 20.0) -> None:
        self.websocket = websocket
        self.name = name
        self.models: dict[str, ModelInfo] = {}
        self.kept_voices: dict[str, KeptVoice] = {}  # by id, as the node last listed them
        self.consents: dict[str, Consent] = {}
        self._calls: dict[int, _PendingCall] = {}
        self.conn = Connection("relay")
        self.streams: dict[int, Stream] = {}
        self._send_lock = asyncio.Lock()
        # A node that takes none of our frames for this long is dropped (see _send).
        self.send_timeout = send_timeout
        self.closed = False
        self.dropped = False  # given up on by us, not closed by the node
        self._reader: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    @property
    def outstanding(self) -> int:
        return len(self.streams)

    @property
    def draining(self) -> bool:
        """The node said it is leaving: it finishes its streams and takes no new ones."""
        return self.conn.peer_draining

    async def open_stream(self, request: Request) -> Stream:
        if self.closed or self.draining or self.conn.draining_sent:
            raise NodeGone()
        stream = Stream(self, request.id)
        self.streams[request.id] = stream
        try:
            # Shielded: once counted as sent, the request reaches the node, so the cancel below
            # follows it and the node ends the stream (a stream the node never saw would stay
            # half-open in the protocol state for the life of the tunnel).
            await asyncio.shield(self._send(request))
        except asyncio.CancelledError:  # the client left while the request was being sent
            closing = asyncio.ensure_future(stream.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            raise
        return stream

    def new_stream_id(self) -> int:
        return self.conn.new_stream_id()

    @property
    def clones(self) -> bool:
        """Whether the node keeps voices: it serves a model that speaks them (a Base model)."""
        return any(info.clones for info in self.models.values())

    async def call(self, message: Call, body: bytes, timeout: float) -> Done | Error:
        """Send a call (with its upload, within the node's credit) and wait for the node's answer.
        Raises NodeGone if the node leaves first, TimeoutError if it takes longer than ``timeout``."""
        if self.closed or self.draining or self.conn.draining_sent:
            raise NodeGone()
        pending = self._calls[message.id] = _PendingCall()
        try:
            async with asyncio.timeout(timeout):
                await self._send(message)
                while body:
                    credit = min(self.conn.credit(message.id), MAX_AUDIO_PAYLOAD)
                    if not credit:
                        pending.credited.clear()
                        await pending.credited.wait()  # also set by the answer, or the node leaving
                        if pending.answer.done():  # answered before taking it all: an error
                            break
                        continue
                    await self._send(Body(message.id, body[:credit]))
                    body = body[credit:]
                return await pending.answer
        finally:
            self._calls.pop(message.id, None)

    async def cancel(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        if not self.closed:
            await self._send(Cancel(stream.id))

    async def send_text(self, text: Text) -> None:
        if not self.closed and text.id in self.conn.live_text:  # else the stream ended meanwhile
            await self._send(text)

    async def grant(self, stream_id: int, size: int) -> None:
        if not self.closed and stream_id in self.conn.open_streams:  # else it ended while we forwarded
            await self._send(Credit(stream_id, size))

    async def announce_draining(self) -> None:
        """This relay is shutting down: no new requests will come; open streams carry on."""
        if not self.closed and not self.conn.draining_sent:
            await self._send(Draining())

    async def _send(self, message: Request | Text | Credit | Cancel | Draining | Call | Body) -> None:
        frame = self.conn.send(message)
        try:
            async with asyncio.timeout(self.send_timeout):
                async with self._send_lock:
                    if isinstance(frame, bytes):
                        await self.websocket.send_bytes(frame)
                    else:
                        await self.websocket.send_text(frame)
        except TimeoutError:
            log.warning("node %s took none of our frames for %.0f s; dropping it", self.name, self.send_timeout)
            self.drop()
        except Exception as exc:  # the socket is going away; the reader will clean up
            log.info("node %s: send failed: %s", self.name, exc)

    def drop(self) -> None:
        """Give up on a node whose socket no longer drains (frozen, half-open) by ending its reader.

        The server's own ping timeout is not enough here: it closes the socket gracefully, which
        waits for the send buffer to empty, so with frames queued for a frozen node neither the
        close nor our reader would ever finish. Ending the reader runs the endpoint's cleanup: the
        node leaves the router and its streams fail over or end with an error.
        """
        self.dropped = True
        if self._reader is not None:
            self._reader.cancel()

    async def run(self, router: Router) -> None:
        """Read frames until the node leaves; route each to its stream. The first must be hello."""
        self._reader = asyncio.current_task()
        frame = await asyncio.wait_for(self._receive_frame(), HELLO_TIMEOUT)
        while frame is not None:
            message = self.conn.receive(frame)
            match message:
                case Hello():
                    self.models = {model.name: model for model in message.models}
                    log.info("node %s (%s) serves %s", self.name, message.node, ", ".join(self.models) or "nothing yet")
                    router.add(self)
                    if router.draining:  # it connected just before the relay began to drain
                        await self.announce_draining()
                case VoiceList():
                    self.kept_voices = {voice.id: voice for voice in message.voices}
                case ConsentList():
                    self.consents = {consent.id: consent for consent in message.consents}
                case Draining():
                    log.info("node %s is draining: no new work for it; %d streams finish", self.name, self.outstanding)
                case Credit():  # for an upload
                    if message.id in self._calls:
                        self._calls[message.id].credited.set()
                case Done() | Error() if message.id in self._calls:
                    self._calls[message.id].answer.set_result(message)
                    self._calls[message.id].credited.set()
                case Audio() | End() | Error():
                    stream = self.streams.get(message.id)
                    if isinstance(message, (End, Error)):
                        self.streams.pop(message.id, None)
                    if stream is not None:
                        stream.deliver(message)
            frame = await self._receive_frame()

    async def _receive_frame(self) -> str | bytes | None:
        raw = await self.websocket.receive()
        if raw["type"] == "websocket.disconnect":
            return None
        return raw["text"] if raw.get("text") is not None else raw["bytes"]

    def fail_all(self) -> None:
        self.closed = True
        for stream in self.streams.values():
            stream.deliver(NodeGone())
        self.streams.clear()
        for pending in self._calls.values():
            if not pending.answer.done():
                pending.answer.set_exception(NodeGone())
            pending.credited.set()


async def tunnel_challenge(request: HttpRequest) -> JSONResponse:
    """``GET /v1/tunnel/challenge``: a fresh challenge for a node's next handshake (see protocol.py)."""
    address = request.client.host if request.client else "unknown"
    wait = request.app.state.challenge_limiter.take(address)
    if wait:
        return _tunnel_error(
            429, "too many challenges asked for from this address", "rate_limit_exceeded", {"Retry-After": str(retry_after(wait))}
        )
    challenges = request.app.state.challenges
    return JSONResponse({"challenge": challenges.issue(), "expires_in": round(challenges.ttl)}, headers={"Cache-Control": "no-store"})


async def tunnel_endpoint(websocket: WebSocket) -> None:
    """``/v1/tunnel``: authenticate at the handshake, then serve the node until it leaves."""
    node_name = await _authenticate(websocket)
    if node_name is None:
        return
    config, router = websocket.app.state.config, websocket.app.state.router
    await websocket.accept(subprotocol=protocol.SUBPROTOCOL)
    session = NodeSession(websocket, node_name, send_timeout=config.ping_interval + config.ping_timeout)
    websocket.app.state.metrics.node_connected(session)
    log.info("node %s connected from %s", node_name, _peer(websocket))
    broken = None
    try:
        await session.run(router)
    except (ProtocolError, asyncio.TimeoutError) as exc:
        broken = str(exc) or "no hello in time"
        log.warning("node %s broke the protocol: %s", node_name, broken)
    except asyncio.CancelledError:
        if not session.dropped:
            raise
        asyncio.current_task().uncancel()  # type: ignore[union-attr]  # our own drop: end quietly
    finally:
        router.remove(session)  # before any closing handshake: no new work goes to it meanwhile
        session.fail_all()
        websocket.app.state.metrics.node_left(session)
        log.info("node %s disconnected", node_name)
    if broken is not None:
        await _close(websocket, CLOSE_PROTOCOL_ERROR, broken)


async def _authenticate(websocket: WebSocket) -> str | None:
    """The connecting node's token name, or None once the handshake has been refused (answered
    with the reason; the challenge is used up either way)."""
    offered = websocket.scope.get("subprotocols", [])
    # The version first: an old node is told to upgrade, not that its token is wrong.
    if protocol.SUBPROTOCOL not in offered:
        shown = [str(p)[:40] for p in offered[:4]]  # what an unauthenticated peer sent: logged short
        log.warning("refused a node from %s: it speaks %s, this relay %s", _peer(websocket), shown, protocol.SUBPROTOCOL)
        await _deny(
            websocket, 426, f"unsupported tunnel protocol {offered}; this relay speaks {protocol.SUBPROTOCOL}", "unsupported_protocol"
        )
        return None
    credential = parse_tunnel_authorization(websocket.headers.get("authorization"))
    if credential is None:
        log.warning("refused a node from %s: no credential", _peer(websocket))
        await _deny(websocket, 401, "send Authorization: Tunnel-HMAC <challenge>:<proof>", "missing_node_credential")
        return None
    challenge, proof = credential
    # Used up now, right or wrong: a handshake seen once (even a failed one) never works again.
    if not websocket.app.state.challenges.consume(challenge):
        log.warning("refused a node from %s: unknown, expired or already used challenge", _peer(websocket))
        await _deny(websocket, 401, "challenge unknown, expired or already used; fetch a new one", "invalid_challenge")
        return None
    node_name = websocket.app.state.config.node_tokens.match_proof(challenge, proof)
    if node_name is None:
        log.warning("refused a node from %s: wrong token", _peer(websocket))
        await _deny(websocket, 401, "node token not accepted by this relay", "invalid_node_token")
        return None
    if websocket.app.state.router.draining:
        await _deny(websocket, 503, "this relay is shutting down; try again later", "relay_draining")
        return None
    return node_name


async def _deny(websocket: WebSocket, status: int, message: str, code: str) -> None:
    if status == 401:  # every credential refusal comes through here
        websocket.app.state.metrics.auth_failure("tunnel")
    try:
        await websocket.send_denial_response(_tunnel_error(status, message, code))
    except RuntimeError:  # the server lacks the denial extension: a bare refusal still refuses
        await websocket.close(code=1008)


def _tunnel_error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An answer to a node before its tunnel is open, in the API's error shape."""
    body = {"error": {"message": message, "type": "tunnel_error", "param": None, "code": code}}
    return JSONResponse(body, status, headers=headers)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    reason = reason.encode()[:120].decode(errors="ignore")  # a close frame holds 123 bytes of reason
    try:
        await websocket.close(code=code, reason=reason)
    except Exception:
        pass


def _peer(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else "unknown"
