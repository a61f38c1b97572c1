"""``/v1/audio/speech/stream``: speech while the text is still being written, over a websocket
(the messages are in ``live_protocol``).

Two tasks per session: the reader takes the client's messages and turns text into utterances (in
``continuous`` mode one utterance whose text keeps flowing to its node as it arrives); the
speaker speaks the utterances in order, each through ``speech.open_stream`` like an HTTP request
(least busy node, another one if a node leaves before its first audio), and sends their audio
back as it comes. ``session.close``, a dropped socket or a broken limit ends both, and closing a
stream tells its node to stop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from starlette.websockets import WebSocket, WebSocketDisconnect

from tunnel.credentials import bearer_token
from tunnel.protocol import MAX_INPUT_CHARS, MAX_LIVE_CHARS, Audio, End, Error

from .auth import key_holder
from .errors import ApiError
from .limits import retry_after
from .live_protocol import InputDone, InputText, LiveError, SessionClose, SessionConfig, Splitter, parse_message
from .speech import open_stream
from .speech_request import SpeechRequest
from .tunnel_server import NodeGone, Stream

log = logging.getLogger("relay.live")

KEY_SUBPROTOCOL = "openai-insecure-api-key."  # OpenAI Realtime's form, for browsers that cannot set headers
REALTIME_SUBPROTOCOL = "realtime"
CONFIG_TIMEOUT = 10.0  # seconds to send session.config
MAX_SESSION_CHARS = 16 * MAX_LIVE_CHARS  # all the text of one session
CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_FAILED = 1000, 1008, 1009, 1011
SAMPLE_RATE = 24000  # what the models speak; opus decodes at 48 kHz whatever it carries


class _End(Exception):
    """The session ends: tell the client why (unless it left), then close with ``code``."""

    def __init__(self, code: int, message: str | None = None, error_code: str = "invalid_request") -> None:
        self.code, self.message, self.error_code = code, message, error_code


class _LiveText:
    """A continuous utterance's text: what the client has written so far, and the task that
    sends what its node has not had yet, as it comes (``SpeechRequest.live``)."""

    def __init__(self) -> None:
        self.text = ""
        self.done = False
        self._stream: Stream | None = None
        self._sent = 0
        self._done_sent = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def add(self, text: str) -> None:
        self.text += text
        self._wake.set()

    def finish(self) -> None:
        self.done = True
        self._wake.set()

    def attach(self, stream: Stream) -> None:
        """The request went to ``stream`` with the text so far; send it the rest (a node that
        left before its first audio is replaced by another, which gets everything anew)."""
        self._stream, self._sent, self._done_sent = stream, len(self.text), False
        if self._task is None:
            self._task = asyncio.ensure_future(self._forward())
        self._wake.set()

    async def _forward(self) -> None:
        while not self._done_sent:
            await self._wake.wait()
            self._wake.clear()
            while self._stream is not None and (self._sent < len(self.text) or (self.done and not self._done_sent)):
                piece = self.text[self._sent : self._sent + MAX_INPUT_CHARS]
                self._sent += len(piece)
                done = self.done and self._sent == len(self.text)
                await self._stream.more_text(piece, done)
                self._done_sent = done

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class _Unit:
    """One utterance to speak: a sentence, or a whole text (written already, or still being written)."""

    utterance_index: int
    sentence_index: int
    config: SessionConfig
    text: str = ""
    live: _LiveText | None = None
    first_text_at: float = field(default_factory=time.monotonic)


@dataclass
class _Flush:
    """After the units of one ``input.done``: say so."""

    utterance_index: int
    total_sentences: int


async def speech_stream(websocket: WebSocket) -> None:
    app = websocket.app
    try:
        client = _admit(websocket)
    except ApiError as refusal:  # an OpenAI-shaped answer instead of the websocket
        try:
            await websocket.send_denial_response(refusal.response())
        except RuntimeError:  # a server without the denial extension: a bare refusal still refuses
            await websocket.close(code=CLOSE_POLICY)
        return
    offered = websocket.scope.get("subprotocols", [])
    app.state.metrics.live_sessions.inc()
    try:
        await websocket.accept(subprotocol=REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None)
        await LiveSession(websocket, client).run()
    finally:
        app.state.open_requests.release(client)
        app.state.metrics.live_sessions.dec()


def _admit(websocket: WebSocket) -> str:
    """Who the session counts against (``key:<name>``, or ``addr:<host>`` without keys); raises
    ApiError to refuse it. The key comes as ``Authorization: Bearer`` or as the subprotocol
    ``openai-insecure-api-key.<key>``; never in the URL. The session holds one of the key's open
    requests while it lasts, and takes from its rate limit once now and once per utterance."""
    app = websocket.app
    config = app.state.config
    client = f"addr:{websocket.client.host if websocket.client else 'unknown'}"
    if config.require_api_key:
        offered = [str(p) for p in websocket.scope.get("subprotocols", [])]
        subprotocol_key = next((p[len(KEY_SUBPROTOCOL) :] for p in offered if p.startswith(KEY_SUBPROTOCOL)), None)
        try:
            client = key_holder(config.api_keys, bearer_token(websocket.headers.get("authorization")) or subprotocol_key)
        except ApiError as refusal:
            if refusal.code == "invalid_api_key":  # the HTTP routes' refusals are counted by the middleware
                app.state.metrics.auth_failure("api")
            raise
    if app.state.router.draining:
        raise ApiError(503, "This relay is shutting down; retry shortly.", code="relay_draining")
    wait = app.state.rate_limiter.take(client)
    if wait:
        seconds = retry_after(wait)
        raise ApiError(429, f"Rate limit reached; retry in {seconds} s.", code="rate_limit_exceeded", retry_after=seconds)
    if not app.state.open_requests.acquire(client):
        raise ApiError(429, "Too many requests open at once for this API key.", code="too_many_concurrent_requests")
    return client


class LiveSession:
    def __init__(self, websocket: WebSocket, client: str) -> None:
        self.websocket = websocket
        app = websocket.app
        self.router, self.relay_config, self.metrics = app.state.router, app.state.config, app.state.metrics
        self.rate_limiter, self.client = app.state.rate_limiter, client
        self.config: SessionConfig | None = None
        self.units: asyncio.Queue[_Unit | _Flush] = asyncio.Queue()
        self.pending = 0  # units and flushes queued or being spoken
        self.splitter: Splitter | None = None
        self.whole = ""  # split_granularity none: the text until input.done
        self.live: _LiveText | None = None  # continuous: the utterance being written
        self.utterance_index = 0
        self.sentence_index = 0
        self.chars = 0
        self.spoken = 0  # utterances begun
        self.id = "live_" + secrets.token_hex(8)

    async def run(self) -> None:
        reader = asyncio.ensure_future(self._read())
        speaker = asyncio.ensure_future(self._speak())
        done, _ = await asyncio.wait((reader, speaker), return_when=asyncio.FIRST_COMPLETED)
        for task in (reader, speaker):
            task.cancel()
        results = await asyncio.gather(reader, speaker, return_exceptions=True)
        if self.live is not None:
            await self.live.close()
        end = next((r for r in results if isinstance(r, _End)), None)
        if end is None:
            failure = next((r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)), None)
            if failure is not None and not isinstance(failure, WebSocketDisconnect):
                log.error("%s: the session failed", self.id, exc_info=failure)
                end = _End(CLOSE_FAILED, "The relay failed to handle this session.", "internal_error")
        if end is not None:
            log.info("%s: ending (%d): %s", self.id, end.code, end.message or "closed")
            if end.message:
                await self._send_json({"type": "error", "message": end.message, "code": end.error_code})
            try:
                await self.websocket.close(code=end.code)
            except Exception:  # the client is gone already
                pass

    # --- the client's messages ---------------------------------------------------------------

    async def _read(self) -> None:
        started = time.monotonic()
        idle, longest = self.relay_config.live_idle_timeout, self.relay_config.live_max_seconds
        while True:
            timeout = CONFIG_TIMEOUT if self.config is None else idle
            left = started + longest - time.monotonic()
            try:
                raw = await asyncio.wait_for(self.websocket.receive(), min(timeout, max(left, 0.001)))
            except TimeoutError:
                if time.monotonic() - started >= longest:
                    raise _End(CLOSE_POLICY, f"The session is longer than {longest:.0f} s.", "session_too_long") from None
                if self.config is None:
                    raise _End(CLOSE_POLICY, "Timeout waiting for session.config.", "timeout") from None
                if self.pending:  # the client waits for audio
                    continue
                raise _End(CLOSE_POLICY, f"Idle timeout: no message for {idle:.0f} s.", "timeout") from None
            if raw["type"] == "websocket.disconnect":
                return
            try:
                message = parse_message(raw.get("text") if raw.get("text") is not None else raw.get("bytes"))
            except LiveError as error:
                if error.code == "message_too_large":
                    raise _End(CLOSE_TOO_BIG, error.message, error.code) from None
                if self.config is None:
                    raise _End(CLOSE_POLICY, error.message, error.code) from None
                await self._send_json({"type": "error", "message": error.message, "code": error.code})
                continue
            match message:
                case SessionConfig() if self.whole or self.live is not None or self.sentence_index:
                    refusal = "session.config cannot be applied while an utterance is in progress; send input.done first."
                    await self._send_json({"type": "error", "message": refusal, "code": "utterance_in_progress"})
                case SessionConfig():
                    self._configure(message)
                case _ if self.config is None:
                    raise _End(CLOSE_POLICY, f"Expected session.config, got: {type(message).__name__}.")
                case InputText(text):
                    self._write(text)
                case InputDone():
                    self._done()
                case SessionClose():
                    raise _End(CLOSE_NORMAL)

    def _configure(self, config: SessionConfig) -> None:
        self.config = config
        self.splitter = Splitter(config.granularity) if config.granularity in ("sentence", "clause") else None

    def _write(self, text: str) -> None:
        assert self.config is not None
        if not text:
            return
        self.chars += len(text)
        if self.chars > MAX_SESSION_CHARS:
            raise _End(CLOSE_POLICY, f"The session's text is longer than {MAX_SESSION_CHARS} characters.", "text_too_long")
        if self.config.granularity == "continuous":
            if self.live is None:
                self.live = _LiveText()
                self._queue(_Unit(self.utterance_index, self.sentence_index, self.config, live=self.live))
                self.sentence_index += 1
            if len(self.live.text) + len(text) > MAX_LIVE_CHARS:
                raise _End(CLOSE_POLICY, f"An utterance's text is longer than {MAX_LIVE_CHARS} characters.", "text_too_long")
            self.live.add(text)
        elif self.splitter is not None:
            for sentence in self.splitter.feed(text):
                self._sentence(sentence)
        else:
            if len(self.whole) + len(text) > MAX_INPUT_CHARS:
                raise _End(CLOSE_POLICY, f"An utterance's text is longer than {MAX_INPUT_CHARS} characters.", "text_too_long")
            self.whole += text

    def _sentence(self, text: str) -> None:
        assert self.config is not None
        for start in range(0, len(text), MAX_INPUT_CHARS):  # a sentence longer than a request: in parts
            self._queue(_Unit(self.utterance_index, self.sentence_index, self.config, text=text[start : start + MAX_INPUT_CHARS]))
            self.sentence_index += 1

    def _done(self) -> None:
        if self.live is not None:
            self.live.finish()
            self.live = None
        elif self.splitter is not None:
            for sentence in self.splitter.flush():
                self._sentence(sentence)
        elif self.whole.strip():
            self._sentence(self.whole.strip())
        self.whole = ""
        self._queue(_Flush(self.utterance_index, self.sentence_index))
        self.utterance_index += 1
        self.sentence_index = 0

    def _queue(self, item: _Unit | _Flush) -> None:
        self.pending += 1
        self.units.put_nowait(item)

    # --- speaking ------------------------------------------------------------------------------

    async def _speak(self) -> None:
        while True:
            item = await self.units.get()
            try:
                if isinstance(item, _Flush):
                    await self._send_json(
                        {"type": "session.done", "utterance_index": item.utterance_index, "total_sentences": item.total_sentences}
                    )
                else:
                    await self._utterance(item)
            finally:
                self.pending -= 1

    async def _utterance(self, unit: _Unit) -> None:
        """Speak one unit and send its audio; raises _End if its node fails once audio has begun."""
        config = unit.config
        if self.spoken and self.rate_limiter.take(self.client):  # each utterance after the first counts too
            raise _End(CLOSE_POLICY, "Rate limit reached.", "rate_limit_exceeded")
        self.spoken += 1
        speech = SpeechRequest(
            model=config.model,
            input=unit.text or "…",
            voice=config.voice,
            instructions=config.instructions,
            response_format=config.response_format,
            speed=config.speed,
            live=unit.live,
        )
        indices = {"utterance_index": unit.utterance_index, "sentence_index": unit.sentence_index}
        request_id = f"{self.id}_{unit.utterance_index}_{unit.sentence_index}"
        event: Audio | End | Error
        try:
            stream, event = await open_stream(self.router, self.relay_config, speech, request_id)
        except ApiError as error:  # no node could take it: this utterance fails, the session goes on
            await self._send_json({"type": "error", "message": error.message, "code": error.code, **indices})
            await self._send_json({"type": "audio.done", **indices, "total_bytes": 0, "error": True})
            return
        total = 0
        try:
            await self._send_json(
                {
                    "type": "audio.start",
                    **indices,
                    "sentence_text": unit.live.text if unit.live else unit.text,
                    "format": config.response_format,
                    "sample_rate": SAMPLE_RATE,
                    "channels": 1,
                }
            )
            while isinstance(event, Audio):
                try:
                    await self.websocket.send_bytes(event.data)
                except Exception:  # the client left
                    raise _End(CLOSE_NORMAL) from None
                if not total:
                    self.metrics.live_first_audio.observe(time.monotonic() - unit.first_text_at)
                total += len(event.data)
                await stream.consumed(len(event.data))
                event = await stream.next_event(self.relay_config.stream_idle_timeout)
            if isinstance(event, End):
                await self._send_json({"type": "audio.done", **indices, "total_bytes": total, "error": False})
                return
            failure = event.message or "The node failed."
        except NodeGone:
            failure = "The node disconnected mid-utterance."
        except TimeoutError:
            failure = "The node stopped sending audio."
        finally:
            await stream.close()
        log.warning("%s: %s", request_id, failure)
        await self._send_json({"type": "audio.done", **indices, "total_bytes": total, "error": True})
        raise _End(CLOSE_FAILED, failure, "node_failed")

    async def _send_json(self, event: dict) -> None:
        try:
            await self.websocket.send_json(event)
        except Exception:  # the client left; the reader sees it
            pass
