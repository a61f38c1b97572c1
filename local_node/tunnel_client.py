"""The node's end of the tunnel: dial out to the relay, serve its requests, reconnect when it drops."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from relay.protocol import (
    MAX_FRAME_BYTES,
    SUBPROTOCOL,
    Cancel,
    Connection,
    End,
    Error,
    Hello,
    ProtocolError,
    Request,
    audio_frames,
)

from .engine import JobError
from .worker import Busy, ModelWorker

log = logging.getLogger("local_node.tunnel")

PING_INTERVAL = 20.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 60.0  # a connection that lived this long resets the backoff


class Refused(Exception):
    """The relay refused this node for good (wrong token, other protocol version): do not retry."""


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with full jitter, so many nodes do not reconnect in step."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 16)))


class TunnelClient:
    def __init__(self, url: str, token: str, node_name: str, workers: dict[str, ModelWorker]) -> None:
        self.url = url
        self._token = token
        self.node_name = node_name
        self.workers = workers

    async def run_forever(self) -> None:
        """Keep a connection to the relay; raises Refused when retrying cannot help."""
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                async with connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self._token}"},
                    subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                    max_size=MAX_FRAME_BYTES + 1024,
                    ping_interval=PING_INTERVAL,
                    ping_timeout=PING_INTERVAL,
                    open_timeout=15,
                    user_agent_header="qwen3-tts-node",
                ) as ws:
                    log.info("connected to %s", self.url)
                    await self._serve(ws)
                    log.warning("relay closed the tunnel: %s", ws.close_reason or ws.close_code)
            except InvalidStatus as exc:
                status = exc.response.status_code
                detail = exc.response.body.decode(errors="replace")[:300] if exc.response.body else ""
                if status in (401, 403):
                    raise Refused(f"the relay refused this node's token (HTTP {status}). Check relay.token / "
                                  "relay.token_env in the node config against RELAY_NODE_TOKENS on the relay.") from None
                if status == 426:
                    raise Refused(f"the relay speaks another tunnel protocol version: {detail}. Upgrade the older side.") from None
                log.warning("relay answered HTTP %s: %s", status, detail)
            except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                log.warning("relay %s unreachable or dropped: %s", self.url, exc or type(exc).__name__)
            attempt = 0 if time.monotonic() - started > STABLE_AFTER else attempt + 1
            delay = backoff_delay(attempt)
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _serve(self, ws: ClientConnection) -> None:
        conn = Connection("node")
        jobs: dict[int, tuple[asyncio.Task, threading.Event, str]] = {}
        models = tuple(worker.engine.info for worker in self.workers.values())
        await ws.send(conn.send(Hello(self.node_name, models)))
        try:
            async for frame in ws:
                try:
                    message = conn.receive(frame)
                except ProtocolError as exc:
                    log.error("relay broke the protocol: %s", exc)
                    await ws.close(1002, str(exc).encode()[:120].decode(errors="ignore"))
                    return
                if isinstance(message, Request):
                    cancelled = threading.Event()
                    task = asyncio.create_task(self._handle(ws, conn, message, cancelled))
                    jobs[message.id] = (task, cancelled, message.request_id)
                    task.add_done_callback(lambda _, i=message.id: jobs.pop(i, None))
                elif isinstance(message, Cancel) and message.id in jobs:
                    _, cancelled, request_id = jobs[message.id]
                    log.info("%s: cancelled by the relay", request_id)
                    cancelled.set()
        finally:
            # The relay has already failed these streams; stop the work and wait for the threads to notice.
            for _, cancelled, _ in jobs.values():
                cancelled.set()
            await asyncio.gather(*(task for task, _, _ in list(jobs.values())), return_exceptions=True)

    async def _handle(self, ws: ClientConnection, conn: Connection, request: Request, cancelled: threading.Event) -> None:
        log.info("%s: stream %d, model %s, voice %s, %d chars, %s",
                 request.request_id, request.id, request.model, request.voice, len(request.input), request.response_format)
        started = time.monotonic()

        async def emit(data: bytes) -> None:
            for frame in audio_frames(request.id, data):
                await ws.send(frame)

        try:
            worker = self.workers.get(request.model)
            if worker is None:
                raise JobError("unknown_model", f"This node does not serve model '{request.model}'.")
            input_tokens, frames = await worker.run(request, cancelled, emit)
            await ws.send(conn.send(End(request.id, input_tokens, frames)))
            log.info("%s: done, %d frames in %.2f s", request.request_id, frames, time.monotonic() - started)
        except ConnectionClosed:
            cancelled.set()
        except JobError as exc:
            await self._send_error(ws, conn, request, exc.code, exc.message)
        except Busy:
            await self._send_error(ws, conn, request, "busy", "The model's queue is full.")
        except Exception:
            log.exception("%s: synthesis failed", request.request_id)
            await self._send_error(ws, conn, request, "internal_error", "Synthesis failed on the node.")

    @staticmethod
    async def _send_error(ws: ClientConnection, conn: Connection, request: Request, code: str, message: str) -> None:
        try:
            await ws.send(conn.send(Error(request.id, code, message[:1000])))
        except ConnectionClosed:
            pass
