"""Per-client limits, sans I/O: a request rate (token bucket) and a count of open requests.

A client is an API key's name, or a client address when the relay serves without keys. Both
structures hold state only for clients seen lately, never more than a fixed number, so a flood
of addresses cannot grow memory.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable

MAX_CLIENTS = 10_000


class RateLimiter:
    """``per_minute`` requests per client: a token bucket holding up to ``per_minute`` tokens (the
    burst), refilled continuously at ``per_minute / 60`` a second. ``per_minute`` 0: no limit.

    Buckets are kept for the ``max_clients`` most recently seen clients; one evicted comes back
    full, which only matters when more clients than that are active at once.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_clients: int = MAX_CLIENTS) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0  # tokens a second
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str) -> float:
        """Spend one of ``client``'s tokens: 0.0 if it had one, else the seconds until it has one
        (and nothing is spent)."""
        if not self.per_minute:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.pop(client, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * self._rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[client] = (tokens, now)  # most recently seen last
        if len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(wait: float) -> int:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait))


class ConcurrencyLimiter:
    """At most ``limit`` open requests per client (0: no limit). Only clients with a request open
    are kept, so memory follows the requests in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        """Count a new open request for ``client``; False (and nothing counted) when at the limit."""
        count = self._open.get(client, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    def open(self, client: str) -> int:
        return self._open.get(client, 0)
