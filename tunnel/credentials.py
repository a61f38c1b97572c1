"""Secrets both ends check: client API keys (relay), node tokens (relay) and the node's metrics
token, compared in constant time, never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re

from .handshake import tunnel_proof


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


class RedactCredentials(logging.Filter):
    """Keeps secrets a peer sent out of the websocket servers' and clients' logs: websockets logs
    every handshake header at DEBUG level (the Authorization value, a key sent as a subprotocol),
    and uvicorn logs each websocket's path, query string included, where a client may have put a
    key although none is read from there."""

    _SUBPROTOCOL_KEY = re.compile(r"(openai-insecure-api-key\.)[^\s,]+")
    _QUERY = re.compile(r"\?\S*")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple):
            return True
        if len(args) == 2 and str(args[0]).lower() == "authorization":
            args = (args[0], "[redacted]")
        if "WebSocket %s" in str(record.msg):
            args = tuple(self._QUERY.sub("?[redacted]", a) if isinstance(a, str) else a for a in args)
        record.args = tuple(self._SUBPROTOCOL_KEY.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in args)
        return True


def _digest(secret: str) -> bytes:
    # Comparing fixed-size digests keeps even the secrets' lengths out of the timing.
    return hashlib.sha256(secret.encode(errors="surrogatepass")).digest()
