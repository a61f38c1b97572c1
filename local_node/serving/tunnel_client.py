"""The node's end of the tunnel: dial out to each relay, serve its requests, reconnect when it drops,
and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from local_node.engine.base import JobError, TextFeed
from local_node.serving.metrics import NodeMetrics
from local_node.serving.voices import VoiceKeeper
from local_node.serving.worker import Busy, ModelWorker
from tunnel.handshake import tunnel_authorization, valid_challenge
from tunnel.protocol import (
    MAX_AUDIO_PAYLOAD,
    MAX_FRAME_BYTES,
    SUBPROTOCOL,
    Audio,
    Body,
    Call,
    Cancel,
    Connection,
    Credit,
    Done,
    Draining,
    End,
    Error,
    Forget,
    Hello,
    ProtocolError,
    Rename,
    Request,
    Text,
    Upload,
)

log = logging.getLogger("local_node.tunnel")


class Refused(Exception):
    """The relay refused this node for good (wrong token, other protocol version): do not retry."""


class NoChallenge(Exception):
    """The relay handed out no challenge (unreachable, or an odd answer): try again later."""


CHALLENGE_TIMEOUT = 15.0  # seconds, like the websocket's own opening handshake
MAX_UPLOADS = 2  # uploads one relay may have in progress on this node at once


def challenge_url(tunnel_url: str) -> str:
    """Where the relay of ``tunnel_url`` hands out challenges: next to the tunnel, over HTTP(S)
    (``wss://host/v1/tunnel`` -> ``https://host/v1/tunnel/challenge``)."""
    parts = urlsplit(tunnel_url)
    scheme = {"ws": "http", "wss": "https"}[parts.scheme]
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/challenge", parts.query, ""))


def fetch_challenge(url: str, timeout: float = CHALLENGE_TIMEOUT) -> str:
    """GET a challenge (blocking). Raises NoChallenge."""
    request = urllib.request.Request(url, headers={"User-Agent": "qwen3-tts-node", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            challenge = json.loads(response.read(4096))["challenge"]
    except urllib.error.HTTPError as exc:
        hint = " (a relay older than this node has no challenge: upgrade it)" if exc.code == 404 else ""
        raise NoChallenge(f"no challenge from {url}: HTTP {exc.code}{hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # URLError and timeouts are OSErrors
        raise NoChallenge(f"no challenge from {url}: {exc}") from None
    if not valid_challenge(challenge):
        raise NoChallenge(f"no challenge from {url}: the answer holds none")
    return challenge


async def in_daemon_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``asyncio.to_thread``, but on a daemon thread: the default executor's threads are joined when
    ``asyncio.run`` ends, so a request hanging on a frozen relay would hold the node's exit (even
    after a second signal) for its whole timeout."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, daemon=True).start()
    return await future


class Backoff:
    """Delays between reconnection attempts: exponential, capped, with full jitter.

    Full jitter (uniform between 0 and the exponential bound) spreads the nodes that a relay restart
    dropped all at once, so they do not come back in step. The attempt count resets only after a
    connection stayed up ``stable_after`` seconds: a relay that accepts and drops at once is not
    hammered.
    """

    def __init__(
        self, base: float = 1.0, cap: float = 30.0, stable_after: float = 60.0, uniform: Callable[[float, float], float] = random.uniform
    ) -> None:
        self.base, self.cap, self.stable_after = base, cap, stable_after
        self.attempt = 0
        self._uniform = uniform

    def next_delay(self, connected_for: float) -> float:
        """The wait before the next attempt; ``connected_for`` is how long the last connection lived (0: none)."""
        self.attempt = 1 if connected_for >= self.stable_after else self.attempt + 1
        return self._uniform(0, min(self.cap, self.base * 2 ** min(self.attempt - 1, 16)))


@dataclass
class _Incoming:
    """An upload arriving: the call, and its bytes so far (None: counted, not kept)."""

    upload: Upload
    data: bytearray | None
    received: int = 0

    def take(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.data is not None:
            self.data += chunk


@dataclass
class _Job:
    """A request being served, and what stops or resumes its sending."""

    request: Request
    feed: TextFeed | None = None  # a live request's text, still arriving
    cancelled: threading.Event = field(default_factory=threading.Event)
    credited: asyncio.Event = field(default_factory=asyncio.Event)  # the relay granted credit
    task: asyncio.Task | None = None

    def stop(self) -> None:
        self.cancelled.set()
        self.credited.set()  # wakes a send that waits for credit


class TunnelClient:
    """One relay: keep a connection to it and serve the requests it sends."""

    def __init__(
        self,
        url: str,
        token: str,
        node_name: str,
        workers: dict[str, ModelWorker],
        ping_interval: float = 10.0,
        ping_timeout: float = 10.0,
        metrics: NodeMetrics | None = None,
        keeper: VoiceKeeper | None = None,
    ) -> None:
        self.url = url
        self.keeper = keeper
        self.siblings: list[TunnelClient] = [self]  # every relay this node serves (serve_relays)
        self._link = (metrics or NodeMetrics()).link(url)
        self._token = token
        self.node_name = node_name
        self.workers = workers
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._draining = False
        self._live: tuple[ClientConnection, Connection, dict[int, _Job]] | None = None
        self._send_lists_lock = asyncio.Lock()

    async def run_forever(self) -> None:
        """Keep a connection to the relay until drained; raises Refused when retrying cannot help."""
        backoff = Backoff()
        while not self._draining:
            connected_at = None
            try:
                # A fresh challenge for each attempt: the relay takes each once (protocol.py).
                challenge = await in_daemon_thread(fetch_challenge, challenge_url(self.url))
                async with connect(
                    self.url,
                    additional_headers={"Authorization": tunnel_authorization(self._token, challenge)},
                    subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                    max_size=MAX_FRAME_BYTES + 1024,
                    ping_interval=None,  # see _keepalive
                    open_timeout=15,
                    user_agent_header="qwen3-tts-node",
                ) as ws:
                    connected_at = time.monotonic()
                    log.info("connected to %s", self.url)
                    await self._serve(ws)
                    if not self._draining:
                        log.warning("relay %s closed the tunnel: %s", self.url, ws.close_reason or ws.close_code)
            except InvalidStatus as exc:
                status = exc.response.status_code
                detail = exc.response.body.decode(errors="replace")[:300] if exc.response.body else ""
                if status == 401 and _denial_code(exc.response.body) == "invalid_challenge":
                    # Not the token: this relay did not issue the challenge (it restarted between the
                    # two requests, or something in front spreads them over several relays).
                    log.warning(
                        "relay %s did not know the challenge it handed out; if this repeats, make sure this URL reaches one relay process",
                        self.url,
                    )
                elif status in (401, 403):
                    raise Refused(
                        f"the relay {self.url} refused this node's token (HTTP {status}). Check relay.token / "
                        "relay.token_env in the node config against RELAY_NODE_TOKENS on the relay."
                    ) from None
                elif status == 426:
                    raise Refused(
                        f"the relay {self.url} speaks another tunnel protocol version: {detail}. Upgrade the older side."
                    ) from None
                else:
                    log.warning("relay %s answered HTTP %s: %s", self.url, status, detail)
            except NoChallenge as exc:
                log.warning("relay %s unreachable: %s", self.url, exc)
            except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                log.warning("relay %s unreachable or dropped: %s", self.url, exc or type(exc).__name__)
            if self._draining:
                return
            delay = backoff.next_delay(time.monotonic() - connected_at if connected_at else 0.0)
            log.info("reconnecting to %s in %.1f s", self.url, delay)
            await asyncio.sleep(delay)

    async def drain(self) -> None:
        """Tell the relay this node is leaving, let the open streams finish, then close."""
        self._draining = True
        if self._live is None:
            return
        ws, conn, jobs = self._live
        try:
            await ws.send(conn.send(Draining()))
            while jobs:  # requests that crossed the notice on the wire are served too
                await asyncio.wait([job.task for job in jobs.values() if job.task])
            await ws.close(1001, "node draining")
        except ConnectionClosed:
            pass

    async def _serve(self, ws: ClientConnection) -> None:
        if self._draining:  # connected just as the node began to drain
            return
        conn = Connection("node")
        jobs: dict[int, _Job] = {}
        uploads: dict[int, _Incoming] = {}
        calls: set[asyncio.Task] = set()
        models = tuple(worker.engine.info for worker in self.workers.values())
        self._live = (ws, conn, jobs)
        self._link.up()
        keepalive = asyncio.create_task(self._keepalive(ws))
        try:
            await ws.send(conn.send(Hello(self.node_name, models)))
            await self.send_lists()
            async for frame in ws:
                try:
                    message = conn.receive(frame)
                except ProtocolError as exc:
                    log.error("relay %s broke the protocol: %s", self.url, exc)
                    await ws.close(1002, str(exc).encode()[:120].decode(errors="ignore"))
                    return
                if isinstance(message, Request):
                    job = jobs[message.id] = _Job(message, TextFeed(message.input) if message.live else None)
                    job.task = asyncio.create_task(self._handle(ws, conn, job))
                    job.task.add_done_callback(lambda _, i=message.id: jobs.pop(i, None))
                elif isinstance(message, Text) and message.id in jobs:
                    feed = jobs[message.id].feed
                    assert feed is not None  # the protocol lets text reach live requests only
                    if message.text:
                        feed.put(message.text)
                    if message.done:
                        feed.finish()
                elif isinstance(message, Credit) and message.id in jobs:
                    jobs[message.id].credited.set()
                elif isinstance(message, Cancel) and message.id in jobs:
                    log.info("%s: cancelled by the relay", jobs[message.id].request.request_id)
                    jobs[message.id].stop()
                elif isinstance(message, Draining):
                    log.info("relay %s is draining: it sends no new requests", self.url)
                elif isinstance(message, Upload):
                    # Beyond MAX_UPLOADS the bytes are taken but not kept, and the answer is busy.
                    kept = sum(incoming.data is not None for incoming in uploads.values()) < MAX_UPLOADS
                    uploads[message.id] = _Incoming(message, bytearray() if kept else None)
                elif isinstance(message, Body):
                    incoming = uploads[message.id]
                    incoming.take(message.data)
                    await ws.send(conn.send(Credit(message.id, len(message.data))))  # held here, not in the socket
                    if incoming.received == incoming.upload.size:  # a call is answered after its whole upload
                        del uploads[message.id]
                        self._start_call(ws, conn, incoming.upload, None if incoming.data is None else bytes(incoming.data), calls)
                elif isinstance(message, (Forget, Rename)):
                    self._start_call(ws, conn, message, b"", calls)
        finally:
            keepalive.cancel()
            self._live = None
            self._link.down()
            # The relay has already failed these streams; stop the work and wait for the threads to notice.
            for job in jobs.values():
                job.stop()
            await asyncio.gather(*(job.task for job in list(jobs.values()) if job.task), return_exceptions=True)

    async def send_lists(self) -> None:
        """Tell the relay what voices and consents this node keeps (after hello, after changes)."""
        if self.keeper is None or self._live is None:
            return
        ws, conn, _ = self._live
        async with self._send_lists_lock:  # two changes at once: their lists go out in order
            for message in self.keeper.lists():
                try:
                    await ws.send(conn.send(message))
                except ConnectionClosed:
                    return

    def _start_call(self, ws: ClientConnection, conn: Connection, call: Call, data: bytes | None, calls: set[asyncio.Task]) -> None:
        task = asyncio.create_task(self._call(ws, conn, call, data))
        calls.add(task)
        task.add_done_callback(calls.discard)

    async def _call(self, ws: ClientConnection, conn: Connection, call: Call, data: bytes | None) -> None:
        """Do a call on a worker thread; every relay hears the new lists, then this one the answer.
        ``data`` is None for an upload taken beyond MAX_UPLOADS."""
        try:
            if self.keeper is None:
                raise JobError("invalid_request", "This node keeps no voices.")
            if data is None:
                raise JobError("busy", "This node is taking other uploads; retry shortly.")
            if isinstance(call, Upload):
                await asyncio.to_thread(self.keeper.upload, call, data)
            elif isinstance(call, Forget):
                await asyncio.to_thread(self.keeper.forget, call.kind, call.object_id)
            else:
                await asyncio.to_thread(self.keeper.rename, call.object_id, call.name)
            await asyncio.gather(*(client.send_lists() for client in self.siblings))
            answer: Done | Error = Done(call.id)
        except JobError as exc:
            answer = Error(call.id, exc.code, exc.message[:1000])
        except Exception:
            log.exception("a %s call failed", type(call).__name__.lower())
            answer = Error(call.id, "internal_error", "The node failed to do it.")
        try:
            await ws.send(conn.send(answer))
        except ConnectionClosed:
            pass

    async def _keepalive(self, ws: ClientConnection) -> None:
        """Drop a relay that does not answer a ping within ping_timeout (frozen, or the connection
        half-open): at most ping_interval + ping_timeout after its last answer.

        The websockets library's own keepalive would not do: it first waits for the send buffer to
        drain, which never happens when the relay stopped reading while audio was queued for it.
        """
        try:
            while True:
                await asyncio.sleep(self.ping_interval)
                async with asyncio.timeout(self.ping_timeout):
                    await (await ws.ping())
        except TimeoutError:
            log.warning("relay %s did not answer a ping within %.0f s; dropping it", self.url, self.ping_timeout)
            ws.transport.abort()
        except ConnectionClosed:
            pass

    async def _handle(self, ws: ClientConnection, conn: Connection, job: _Job) -> None:
        request = job.request
        log.info(
            "%s: stream %d, model %s, voice %s, %d chars%s, %s",
            request.request_id,
            request.id,
            request.model,
            request.voice,
            len(request.input),
            " (live)" if request.live else "",
            request.response_format,
        )
        started = time.monotonic()

        async def emit(data: bytes) -> None:
            """Send as much as the stream's credit allows, then wait for more. Only this stream waits:
            the model's thread keeps generating into the worker's queue meanwhile."""
            while data and not job.cancelled.is_set():
                credit = conn.credit(request.id)
                if not credit:
                    job.credited.clear()
                    await job.credited.wait()
                    continue
                size = min(len(data), credit, MAX_AUDIO_PAYLOAD)
                await ws.send(conn.send(Audio(request.id, data[:size])))
                data = data[size:]

        try:
            worker = self.workers.get(request.model)
            if worker is None:
                raise JobError("unknown_model", f"This node does not serve model '{request.model}'.")
            input_tokens, frames = await worker.run(request, job.cancelled, emit, feed=job.feed)
            await ws.send(conn.send(End(request.id, input_tokens, frames)))
            log.info("%s: done, %d frames in %.2f s", request.request_id, frames, time.monotonic() - started)
        except ConnectionClosed:
            job.stop()
            log.info("%s: the tunnel closed before the end", request.request_id)
        except JobError as exc:
            await self._send_error(ws, conn, request, exc.code, exc.message)
        except Busy:
            await self._send_error(ws, conn, request, "busy", "The model's queue is full.")
        except Exception:
            log.exception("%s: synthesis failed", request.request_id)
            await self._send_error(ws, conn, request, "internal_error", "Synthesis failed on the node.")

    @staticmethod
    async def _send_error(ws: ClientConnection, conn: Connection, request: Request, code: str, message: str) -> None:
        log.info("%s: answered %s: %s", request.request_id, code, message)
        try:
            await ws.send(conn.send(Error(request.id, code, message[:1000])))
        except ConnectionClosed:
            pass


def _denial_code(body: bytes | None) -> str | None:
    """The ``error.code`` of a relay's JSON refusal, if there is one."""
    try:
        return json.loads(body or b"")["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


async def serve_relays(clients: list[TunnelClient], drain_grace: float) -> None:
    """Serve every relay until SIGTERM or SIGINT, then drain: announce it, finish the open streams
    (at most ``drain_grace`` seconds; a second signal cuts it short) and return.

    Raises Refused when every relay refused this node; one refusal among several is logged and the
    others are served.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for client in clients:  # a change to the voices is told to every relay
        client.siblings = clients
    runs = [asyncio.create_task(client.run_forever()) for client in clients]

    def report(task: asyncio.Task) -> None:
        error = None if task.cancelled() else task.exception()
        if isinstance(error, Refused):
            log.error("%s; not retrying it", error)
        elif error is not None:
            log.error("serving a relay failed", exc_info=error)

    for run in runs:
        run.add_done_callback(report)
    stopping = asyncio.create_task(stop.wait())
    every_relay_refused = asyncio.gather(*runs, return_exceptions=True)
    try:
        await asyncio.wait([stopping, every_relay_refused], return_when=asyncio.FIRST_COMPLETED)
        if every_relay_refused.done():  # a run ends before a drain only by raising
            raise next(r for r in every_relay_refused.result() if isinstance(r, Exception))
        log.info("draining: telling %d relays, finishing open streams (at most %.0f s)", len(clients), drain_grace)
        stop.clear()
        stopping = asyncio.create_task(stop.wait())  # a second signal: leave now
        drained = asyncio.gather(*(client.drain() for client in clients))
        await asyncio.wait([drained, stopping], timeout=drain_grace, return_when=asyncio.FIRST_COMPLETED)
        if not drained.done():
            log.warning("leaving with streams still open")
            drained.cancel()
    finally:
        stopping.cancel()
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
