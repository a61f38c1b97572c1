"""The pure half of the tunnel's handshake (tunnel/protocol.py tells the whole of it): making a
challenge, the proof a node computes from it with its token, and the header that carries both.
No I/O and no state: the relay keeps its issued challenges (relay/auth.py: ChallengeStore), the
node fetches one before each connection (local_node/serving/tunnel_client.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from .protocol import SUBPROTOCOL

TUNNEL_SCHEME = "Tunnel-HMAC"
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # base64url, no padding
_PROOF = re.compile(r"[0-9a-f]{64}")  # hex SHA-256


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
