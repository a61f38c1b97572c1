"""Who is asking: a client's API key, and the relay's side of the node handshake (the bounded
store of challenges it issued; tunnel/handshake.py has the pure parts both ends share,
tunnel/credentials.py the secrets).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from tunnel.credentials import Credentials
from tunnel.handshake import new_challenge

from .errors import ApiError


def key_holder(api_keys: Credentials, key: str | None) -> str:
    """``key:<name>`` for a valid API key, whom the per-key limits count; raises ApiError (401)
    for a missing or a wrong one. Compared in constant time (Credentials)."""
    if not key:
        raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    name = api_keys.match(key)
    if name is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return f"key:{name}"


CHALLENGE_TTL = 30.0  # seconds: a node fetches a challenge and connects at once
MAX_CHALLENGES = 4096  # outstanding at once; a flood of requests evicts the oldest, memory stays flat


class ChallengeStore:
    """The challenges this relay handed out and nobody presented yet: each valid ``ttl`` seconds
    and once. At most ``capacity`` are kept (the oldest goes first), so issuing them to anyone who
    asks cannot grow memory; a challenge evicted by a flood fails like an expired one."""

    def __init__(self, ttl: float = CHALLENGE_TTL, capacity: int = MAX_CHALLENGES, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.capacity = ttl, capacity
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()  # in issue order, hence expiry order

    def __len__(self) -> int:
        return len(self._expiry)

    def issue(self) -> str:
        now = self._clock()
        while self._expiry and (len(self._expiry) >= self.capacity or next(iter(self._expiry.values())) <= now):
            self._expiry.popitem(last=False)
        challenge = new_challenge()
        self._expiry[challenge] = now + self.ttl
        return challenge

    def consume(self, challenge: str) -> bool:
        """True if ``challenge`` was issued here, is unexpired and unused; it is used up either way."""
        expiry = self._expiry.pop(challenge, None)
        return expiry is not None and self._clock() < expiry
