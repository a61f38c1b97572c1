"""The relay's Starlette application: the OpenAI speech API in front, the node tunnel behind."""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp

from tunnel.credentials import bearer_token

from . import playground, voices
from .auth import ChallengeStore, key_holder
from .config import RelayConfig
from .errors import ApiError
from .limits import ConcurrencyLimiter, RateLimiter
from .live import speech_stream
from .metrics import ObserveRequests, RelayMetrics, metrics_endpoint
from .router import Router
from .speech import create_speech
from .tunnel_server import tunnel_challenge, tunnel_endpoint

Endpoint = Callable[[Request], Awaitable[ASGIApp]]  # a Response, or the speech route's streaming app


def api_key_required(endpoint: Endpoint, catalogue: bool = False) -> Endpoint:
    """``endpoint`` behind the API key; a ``catalogue`` (a model or voice list) is open to all
    when RELAY_PUBLIC_CATALOGUE is on."""

    async def guarded(request: Request) -> ASGIApp:
        config: RelayConfig = request.app.state.config
        if config.require_api_key and not (catalogue and config.public_catalogue):
            request.state.client = key_holder(config.api_keys, bearer_token(request.headers.get("authorization")))
        else:
            request.state.client = f"addr:{request.client.host if request.client else 'unknown'}"
        return await endpoint(request)

    return guarded


async def list_models(request: Request) -> JSONResponse:
    """OpenAI's model list: every name and alias a connected node answers to."""
    created = request.app.state.started
    data = []
    for info in request.app.state.router.catalogue().values():
        for model_id in (info.name, *info.aliases):
            data.append({"id": model_id, "object": "model", "created": created, "owned_by": "qwen3-tts", "root": info.name})
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """Ready when at least one node has announced a model; load balancers may poll this.
    Says how many nodes are connected and nothing about them."""
    if request.app.state.router.draining:
        return JSONResponse({"status": "draining", "nodes": 0}, status_code=503)
    nodes = [node for node in request.app.state.router.nodes if node.models]
    if nodes:
        return JSONResponse({"status": "ready", "nodes": len(nodes)})
    return JSONResponse({"status": "no node connected", "nodes": 0}, status_code=503)


async def _api_error(request: Request, exc: Exception) -> Response:
    return exc.response()  # type: ignore[attr-defined]


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    return ApiError(500, "The relay failed to handle this request.", code="internal_error").response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, str(exc.detail), code=code).response()


def create_app(config: RelayConfig) -> Starlette:
    routes = [
        Route("/v1/audio/speech", api_key_required(create_speech), methods=["POST"]),
        WebSocketRoute("/v1/audio/speech/stream", speech_stream),  # authenticates at the handshake
        Route("/v1/models", api_key_required(list_models, catalogue=True), methods=["GET"]),
        Route("/v1/audio/models", api_key_required(voices.list_audio_models, catalogue=True), methods=["GET"]),
        Route("/v1/audio/voices", api_key_required(voices.list_voices, catalogue=True), methods=["GET"]),
        Route("/v1/audio/voices", api_key_required(voices.create_voice), methods=["POST"]),
        Route("/v1/audio/voices/{voice_id}", api_key_required(voices.get_voice), methods=["GET"]),
        Route("/v1/audio/voices/{voice_id}", api_key_required(voices.delete_voice), methods=["DELETE"]),
        Route("/v1/audio/voice_consents", api_key_required(voices.list_consents), methods=["GET"]),
        Route("/v1/audio/voice_consents", api_key_required(voices.create_consent), methods=["POST"]),
        Route("/v1/audio/voice_consents/{consent_id}", api_key_required(voices.get_consent), methods=["GET"]),
        Route("/v1/audio/voice_consents/{consent_id}", api_key_required(voices.update_consent), methods=["POST"]),
        Route("/v1/audio/voice_consents/{consent_id}", api_key_required(voices.delete_consent), methods=["DELETE"]),
        Route("/", playground.page, methods=["GET"]),  # no key: the page asks for one
        Route("/playground", playground.page, methods=["GET"]),
        Route("/playground/{name}", playground.asset, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),  # 404 unless RELAY_METRICS_TOKEN is set
        Route("/v1/tunnel/challenge", tunnel_challenge, methods=["GET"]),
        WebSocketRoute("/v1/tunnel", tunnel_endpoint),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected_error}
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=[Middleware(ObserveRequests)])
    # A trailing slash gets an OpenAI-shaped 404, not Starlette's bodiless 307 to a URL built from
    # the request's Host header (found by fuzzing).
    app.router.redirect_slashes = False
    app.state.config = config
    app.state.router = Router(config.max_streams_per_node)
    app.state.challenges = ChallengeStore()  # for nodes' handshakes
    app.state.challenge_limiter = RateLimiter(config.challenge_rate_limit)  # per address
    app.state.rate_limiter = RateLimiter(config.rate_limit)
    app.state.open_requests = ConcurrencyLimiter(config.max_streams_per_key)
    app.state.started = int(time.time())
    app.state.metrics = RelayMetrics()
    return app
