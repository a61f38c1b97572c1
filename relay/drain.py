"""Graceful shutdown: on SIGTERM the relay stops taking work, tells its nodes, lets the open streams
finish (up to a grace period), and only then lets uvicorn close the connections."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from .router import Router

log = logging.getLogger("relay.drain")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM or SIGINT drains; a second one stops at once.

    While it drains the relay still listens: new requests get 503 with Retry-After, ``/ready``
    says 503 so load balancers move on, and nodes are refused with 503 until it is gone.
    """

    def __init__(self, config: uvicorn.Config, router: Router, grace: float) -> None:
        super().__init__(config)
        self.router = router
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._drain_requested:  # before start-up, or a second signal
            self.force_exit = self._drain_requested
            self.should_exit = True
            return
        self._drain_requested = True
        # Signal handlers run between two bytecodes of the loop's thread: hand over to the loop.
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))  # type: ignore[union-attr]

    async def _drain_then_exit(self) -> None:
        await self.router.drain(self.grace)
        log.info("drained; shutting down")
        self.should_exit = True
