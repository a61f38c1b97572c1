"""Relay settings, read from the environment (a VPS is usually configured that way)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from tunnel.credentials import Credentials


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


@dataclass(frozen=True)
class RelayConfig:
    api_keys: Credentials = field(default_factory=lambda: Credentials({}))
    node_tokens: Credentials = field(default_factory=lambda: Credentials({}))
    # Off only on purpose: with it False, anyone who can reach the relay may use the API.
    require_api_key: bool = True
    # How long a node may take to produce the first audio of a request, queueing included (CPU
    # models are slow), and how long a started stream may then stay silent between pieces.
    first_audio_timeout: float = 300.0
    stream_idle_timeout: float = 120.0
    retry_after_seconds: int = 2
    # Websocket pings to each node: one that stays silent (frozen, half-open TCP) is dropped within
    # ping_interval + ping_timeout seconds, and its streams fail over or end.
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    drain_grace: float = 60.0  # seconds open streams may take to finish after SIGTERM
    # Per client (API key, or address without keys) and per node; 0 turns a limit off.
    rate_limit: int = 60  # speech requests a minute, with a burst of as many
    # Node handshake challenges a minute per address: free to ask for, so kept few, that a flood
    # cannot push nodes' challenges out of the bounded store before they are used.
    challenge_rate_limit: int = 60
    max_streams_per_key: int = 8  # speech requests open at once
    max_streams_per_node: int = 64  # streams this relay keeps open on one node
    # Live text sessions (/v1/audio/speech/stream): seconds without a message while nothing is
    # being spoken, and at most for a whole session.
    live_idle_timeout: float = 30.0
    live_max_seconds: float = 3600.0
    # Serve the model and voice lists (GET /v1/models, /v1/audio/models, /v1/audio/voices) without
    # an API key, for clients that ask for them without one (most Open WebUI versions).
    public_catalogue: bool = False
    # A voice made from an uploaded sample names a consent recording uploaded first, as OpenAI asks.
    require_voice_consent: bool = True
    # Bearer token for GET /metrics; empty (unset): /metrics answers 404, nothing is exposed.
    metrics_token: Credentials = field(default_factory=lambda: Credentials({}))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RelayConfig:
        """Read ``RELAY_API_KEYS``, ``RELAY_NODE_TOKENS`` and friends; see the README."""
        require_api_key = _flag(environ, "RELAY_REQUIRE_API_KEY", True)
        api_keys = _secrets(environ.get("RELAY_API_KEYS", ""), "key")
        node_tokens = _secrets(environ.get("RELAY_NODE_TOKENS", ""), "node")
        if require_api_key and not api_keys:
            raise ConfigError(
                "RELAY_API_KEYS is empty: set one or more client API keys (comma-separated), "
                "or set RELAY_REQUIRE_API_KEY=false to serve the API to anyone on purpose."
            )
        if not node_tokens:
            raise ConfigError("RELAY_NODE_TOKENS is empty: set at least one node token (name:token, comma-separated).")
        return cls(
            api_keys=Credentials(api_keys),
            node_tokens=Credentials(node_tokens),
            require_api_key=require_api_key,
            first_audio_timeout=_number(environ, "RELAY_FIRST_AUDIO_TIMEOUT", cls.first_audio_timeout),
            stream_idle_timeout=_number(environ, "RELAY_STREAM_IDLE_TIMEOUT", cls.stream_idle_timeout),
            retry_after_seconds=max(1, round(_number(environ, "RELAY_RETRY_AFTER", cls.retry_after_seconds))),
            ping_interval=_number(environ, "RELAY_PING_INTERVAL", cls.ping_interval),
            ping_timeout=_number(environ, "RELAY_PING_TIMEOUT", cls.ping_timeout),
            drain_grace=_number(environ, "RELAY_DRAIN_GRACE", cls.drain_grace),
            rate_limit=_count(environ, "RELAY_RATE_LIMIT", cls.rate_limit),
            challenge_rate_limit=_count(environ, "RELAY_CHALLENGE_RATE_LIMIT", cls.challenge_rate_limit),
            max_streams_per_key=_count(environ, "RELAY_MAX_STREAMS_PER_KEY", cls.max_streams_per_key),
            max_streams_per_node=_count(environ, "RELAY_MAX_STREAMS_PER_NODE", cls.max_streams_per_node),
            metrics_token=_metrics_token(environ),
            live_idle_timeout=_number(environ, "RELAY_LIVE_IDLE_TIMEOUT", cls.live_idle_timeout),
            live_max_seconds=_number(environ, "RELAY_LIVE_MAX_SECONDS", cls.live_max_seconds),
            public_catalogue=_flag(environ, "RELAY_PUBLIC_CATALOGUE", cls.public_catalogue),
            require_voice_consent=_flag(environ, "RELAY_REQUIRE_VOICE_CONSENT", cls.require_voice_consent),
        )


def _secrets(value: str, prefix: str) -> dict[str, str]:
    """``name:secret,secret2`` -> {name: secret, prefix2: secret2}. Names appear in logs, secrets never."""
    secrets: dict[str, str] = {}
    for i, entry in enumerate(filter(None, (e.strip() for e in value.split(","))), start=1):
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = f"{prefix}{i}", entry
        if name in secrets:
            raise ConfigError(f"two {prefix} secrets are both named {name!r}")
        if len(secret) < 16:
            raise ConfigError(f"a {prefix} secret ({name}) is shorter than 16 characters; use a long random value")
        secrets[name] = secret
    return secrets


def _flag(environ: Mapping[str, str], key: str, default: bool) -> bool:
    value = environ.get(key, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, not {value!r}")


def _number(environ: Mapping[str, str], key: str, default: float) -> float:
    value = environ.get(key)
    if value is None or not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number, not {value!r}") from None
    if not 0 < number < float("inf"):
        raise ConfigError(f"{key} must be a positive number")
    return number


def _count(environ: Mapping[str, str], key: str, default: int) -> int:
    """A whole number, 0 or more (0: the limit is off)."""
    value = environ.get(key)
    if value is None or not value.strip():
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number, not {value!r}") from None
    if number < 0:
        raise ConfigError(f"{key} must be 0 (no limit) or more")
    return number


def _metrics_token(environ: Mapping[str, str]) -> Credentials:
    """``RELAY_METRICS_TOKEN``: one secret, the whole value (no ``name:`` form)."""
    token = environ.get("RELAY_METRICS_TOKEN", "").strip()
    if token and len(token) < 16:
        raise ConfigError("RELAY_METRICS_TOKEN is shorter than 16 characters; use a long random value")
    return Credentials({"metrics": token} if token else {})
