"""Credentials: client API keys and node tokens, compared in constant time, never logged."""

from __future__ import annotations

import hmac


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
        self._secrets = [(name, secret.encode()) for name, secret in secrets.items()]

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def match(self, presented: str | None) -> str | None:
        """Return the name of the secret that equals ``presented``, or None.

        Every secret is compared, whatever matched, so timing does not reveal which one did.
        """
        if presented is None:
            return None
        candidate = presented.encode()
        found = None
        for name, secret in self._secrets:
            if hmac.compare_digest(candidate, secret) and found is None:
                found = name
        return found
