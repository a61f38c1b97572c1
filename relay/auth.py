"""Credentials: client API keys and node tokens, compared in constant time, never logged.

Also the pure parts of the node's challenge-response handshake (see relay/protocol.py): making a
challenge, the proof a node computes from it, parsing the header that carries both, and the
relay's bounded store of outstanding challenges.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from typing import Callable

from .protocol import SUBPROTOCOL

TUNNEL_SCHEME = "Tunnel-HMAC"
CHALLENGE_TTL = 30.0  # seconds: a node fetches a challenge and connects at once
MAX_CHALLENGES = 4096  # outstanding at once; a flood of requests evicts the oldest, memory stays flat
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # base64url, no padding
_PROOF = re.compile(r"[0-9a-f]{64}")  # hex SHA-256


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Credentials:
    """A set of secrets, each with a name that is safe to log (e.g. which node connected)."""

    def __init__(self, secrets: dict[str, str]) -> None:
        # The secret itself too: a node proves it holds its token by an HMAC keyed with it.
        self._secrets = [(name, _digest(secret), secret) for name, secret in secrets.items()]

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def match(self, presented: str | None) -> str | None:
        """Return the name of the secret that equals ``presented``, or None.

        Every secret is compared, whatever matched, so timing does not reveal which one did.
        """
        if presented is None:
            return None
        candidate = _digest(presented)
        found = None
        for name, digest, _ in self._secrets:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = name
        return found

    def match_proof(self, challenge: str, proof: str) -> str | None:
        """Return the name of the secret whose ``tunnel_proof`` for ``challenge`` is ``proof``, or None.

        As in ``match``, every secret's proof is computed and compared, whatever matched.
        """
        presented = proof.encode(errors="surrogatepass")
        found = None
        for name, _, secret in self._secrets:
            if hmac.compare_digest(tunnel_proof(secret, challenge).encode(), presented) and found is None:
                found = name
        return found


def new_challenge() -> str:
    """32 random bytes, base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def valid_challenge(challenge: object) -> bool:
    """Whether ``challenge`` has a challenge's form (base64url, at most 128 characters)."""
    return isinstance(challenge, str) and _CHALLENGE.fullmatch(challenge) is not None


def tunnel_proof(token: str, challenge: str) -> str:
    """What a node sends to show it holds ``token``: hex HMAC-SHA256 keyed with the token over the
    subprotocol and the challenge. The version in the message ties a proof to one protocol."""
    message = f"{SUBPROTOCOL}\n{challenge}".encode()
    return hmac.new(token.encode(errors="surrogatepass"), message, hashlib.sha256).hexdigest()


def tunnel_authorization(token: str, challenge: str) -> str:
    """The node's ``Authorization`` header value for ``challenge``."""
    return f"{TUNNEL_SCHEME} {challenge}:{tunnel_proof(token, challenge)}"


def parse_tunnel_authorization(authorization: str | None) -> tuple[str, str] | None:
    """``(challenge, proof)`` from an ``Authorization: Tunnel-HMAC <challenge>:<proof>`` header, or
    None when it is missing or malformed."""
    if not authorization:
        return None
    scheme, _, credential = authorization.partition(" ")
    challenge, _, proof = credential.strip().partition(":")
    if scheme.lower() != TUNNEL_SCHEME.lower() or not valid_challenge(challenge) or not _PROOF.fullmatch(proof):
        return None
    return challenge, proof


class ChallengeStore:
    """The challenges this relay handed out and nobody presented yet: each valid ``ttl`` seconds
    and once. At most ``capacity`` are kept (the oldest goes first), so issuing them to anyone who
    asks cannot grow memory; a challenge evicted by a flood fails like an expired one."""

    def __init__(self, ttl: float = CHALLENGE_TTL, capacity: int = MAX_CHALLENGES,
                 clock: Callable[[], float] = time.monotonic) -> None:
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


class RedactCredentials(logging.Filter):
    """websockets logs every handshake header at DEBUG level; the Authorization value stays out."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() == "authorization":
            record.args = (args[0], "[redacted]")
        return True


def _digest(secret: str) -> bytes:
    # Comparing fixed-size digests keeps even the secrets' lengths out of the timing.
    return hashlib.sha256(secret.encode(errors="surrogatepass")).digest()
