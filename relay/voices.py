"""Voices people own, in OpenAI's shapes: consent recordings and voices made from a sample, kept
by the nodes, and the one voice list every client reads.

The relay keeps nothing on disk: an upload goes through the tunnel to every connected node that
can speak kept voices (one with a Base model), which checks the recording, computes the clone
prompt and stores it; each node then lists what it keeps, and the lists here are those lists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from typing import Any, Callable

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from tunnel.protocol import (
    MAX_ID_CHARS,
    MAX_INPUT_CHARS,
    MAX_NAME_CHARS,
    MAX_UPLOAD_BYTES,
    Call,
    Consent,
    Done,
    Error,
    Forget,
    KeptVoice,
    Rename,
    Upload,
)

from .bodies import read_body, read_form
from .config import RelayConfig
from .errors import ApiError, bad_request
from .limits import retry_after
from .router import Router
from .tunnel_server import NodeGone, NodeSession

log = logging.getLogger("relay.voices")

# The recording, plus the form's other fields and its multipart framing.
MAX_FORM_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*|[A-Z][a-z]+")  # BCP 47, or a Qwen name: English
_NODE_ERRORS = {  # a node's error code -> (HTTP status, OpenAI error code)
    "invalid_request": (400, "invalid_value"),
    "not_found": (404, "not_found"),
    "busy": (429, "node_busy"),
}


# --- consents ---------------------------------------------------------------------------------


async def create_consent(request: HttpRequest) -> JSONResponse:
    """``POST /v1/audio/voice_consents``: multipart ``name``, ``language``, ``recording``."""
    _take_rate(request)
    form = await read_form(request, MAX_FORM_BYTES, fields=("name", "language"), files=("recording",))
    recording = _file(form, "recording")
    name = _text(form, "name", MAX_NAME_CHARS)
    language = _language(form, required=True)
    consent = Consent(id="cons_" + secrets.token_hex(12), name=name, language=language or "", created_at=int(time.time()))
    await _everywhere(
        request,
        lambda node: Upload(node.new_stream_id(), "consent", consent.id, name, consent.created_at, len(recording), language=language),
        recording,
        _cloners(request.app.state.router),
    )
    log.info("consent %s stored", consent.id)
    return JSONResponse(_consent_object(consent))


async def list_consents(request: HttpRequest) -> JSONResponse:
    """``GET /v1/audio/voice_consents``: newest first, paged as OpenAI pages (``after``, ``limit``)."""
    consents = sorted(request.app.state.router.consents().values(), key=lambda c: (-c.created_at, c.id))
    limit = request.query_params.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise bad_request("'limit' must be a whole number from 1 to 100.", param="limit")
    after = request.query_params.get("after")
    if after is not None:
        ids = [c.id for c in consents]
        if after not in ids:
            raise bad_request(f"No consent recording with id '{after}' to page after.", param="after")
        consents = consents[ids.index(after) + 1 :]
    page = consents[: int(limit)]
    return JSONResponse(
        {
            "object": "list",
            "data": [_consent_object(c) for c in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(consents) > len(page),
        }
    )


async def get_consent(request: HttpRequest) -> JSONResponse:
    return JSONResponse(_consent_object(_consent(request)))


async def update_consent(request: HttpRequest) -> JSONResponse:
    """``POST /v1/audio/voice_consents/{id}`` with ``{"name": ...}`` (JSON, as the SDK sends it)."""
    consent = _consent(request)
    name = _text(_json_object(await read_body(request, 64 * 1024), ("name",)), "name", MAX_NAME_CHARS)
    holders = [node for node in request.app.state.router.nodes if consent.id in node.consents]
    await _everywhere(request, lambda node: Rename(node.new_stream_id(), consent.id, name), b"", holders)
    return JSONResponse(_consent_object(Consent(consent.id, name, consent.language, consent.created_at)))


async def delete_consent(request: HttpRequest) -> JSONResponse:
    consent = _consent(request)
    holders = [node for node in request.app.state.router.nodes if consent.id in node.consents]
    await _everywhere(request, lambda node: Forget(node.new_stream_id(), "consent", consent.id), b"", holders)
    log.info("consent %s deleted", consent.id)
    return JSONResponse({"id": consent.id, "object": "audio.voice_consent", "deleted": True})


def _consent(request: HttpRequest) -> Consent:
    consent_id = request.path_params["consent_id"]
    consent = request.app.state.router.consents().get(consent_id)
    if consent is None:
        raise ApiError(404, f"No consent recording with id '{consent_id[:MAX_ID_CHARS]}'.", param="consent_id", code="not_found")
    return consent


def _consent_object(consent: Consent) -> dict[str, Any]:
    return {
        "id": consent.id,
        "object": "audio.voice_consent",
        "name": consent.name,
        "language": consent.language,
        "created_at": consent.created_at,
    }


# --- voices -----------------------------------------------------------------------------------


async def create_voice(request: HttpRequest) -> JSONResponse:
    """``POST /v1/audio/voices``: multipart ``name``, ``audio_sample``, ``consent``; ours besides:
    ``ref_text`` (the words spoken in the sample: in-context cloning, a closer likeness) and
    ``language`` (the voice's usual language)."""
    _take_rate(request)
    config: RelayConfig = request.app.state.config
    # prompt, model, script_hint: OpenAI's voices from a description, refused below by their type.
    fields = ("name", "consent", "type", "ref_text", "language", "prompt", "model", "script_hint")
    form = await read_form(request, MAX_FORM_BYTES, fields=fields, files=("audio_sample",))
    if form.get("type", "audio_sample") != "audio_sample":
        raise bad_request(
            "Only voices made from an audio sample (type 'audio_sample') are supported here.", param="type", code="unsupported_value"
        )
    sample = _file(form, "audio_sample")
    name = _text(form, "name", MAX_NAME_CHARS)
    consent = _text(form, "consent", MAX_ID_CHARS, required=config.require_voice_consent) or None
    if consent is not None and consent not in request.app.state.router.consents():
        raise bad_request(f"No consent recording with id '{consent}': upload one first (POST /v1/audio/voice_consents).", param="consent")
    ref_text = _text(form, "ref_text", MAX_INPUT_CHARS, required=False) or None
    language = _language(form, required=False)
    voice = KeptVoice(id="voice_" + secrets.token_hex(12), name=name, created_at=int(time.time()), language=language, consent=consent)
    await _everywhere(
        request,
        lambda node: Upload(
            node.new_stream_id(),
            "voice",
            voice.id,
            name,
            voice.created_at,
            len(sample),
            language=language,
            consent=consent,
            ref_text=ref_text,
        ),
        sample,
        _cloners(request.app.state.router),
    )
    log.info("voice %s stored", voice.id)
    return JSONResponse(_kept_voice_object(voice, _models_keeping(request.app.state.router, voice.id)))


async def get_voice(request: HttpRequest) -> JSONResponse:
    voice_id = request.path_params["voice_id"]
    for entry in voice_catalogue(request.app.state.router, request.app.state.started):
        if entry["id"] == voice_id:
            return JSONResponse(entry)
    raise ApiError(404, f"No voice with id '{voice_id[:MAX_ID_CHARS]}'.", param="voice_id", code="not_found")


async def delete_voice(request: HttpRequest) -> JSONResponse:
    """``DELETE /v1/audio/voices/{id}``: from every node that keeps it. A built-in voice cannot be
    deleted (404, as for an unknown id)."""
    voice_id = request.path_params["voice_id"]
    kept = request.app.state.router.kept_voices().get(voice_id)
    if kept is None:
        raise ApiError(404, f"No uploaded voice with id '{voice_id[:MAX_ID_CHARS]}'.", param="voice_id", code="not_found")
    await _everywhere(request, lambda node: Forget(node.new_stream_id(), "voice", voice_id), b"", kept[1])
    log.info("voice %s deleted", voice_id)
    return JSONResponse({"id": voice_id, "object": "audio.voice.deleted", "deleted": True})


async def list_voices(request: HttpRequest) -> JSONResponse:
    """``GET /v1/audio/voices``: every voice a connected node speaks. OpenAI's list shape
    (``object``, ``data``) with the same entries under ``voices``, where Open WebUI reads them;
    Home Assistant and most other clients take ``data``; each entry has ``id`` and ``name``."""
    voices = voice_catalogue(request.app.state.router, request.app.state.started)
    return JSONResponse({"object": "list", "data": voices, "voices": voices, "has_more": False})


def voice_catalogue(router: Router, started: int) -> list[dict[str, Any]]:
    """The built-in and configured voices of every model (``type: preset``), then the voices the
    nodes keep (``type: audio_sample``), each with the models (names and aliases) that speak it."""
    entries: dict[str, dict[str, Any]] = {}
    for info in router.catalogue().values():
        for name in info.voices:
            entry = entries.setdefault(
                name, {"id": name, "object": "audio.voice", "name": name, "type": "preset", "created_at": started, "models": []}
            )
            entry["models"] += [m for m in (info.name, *info.aliases) if m not in entry["models"]]
    for voice_id, (voice, nodes) in router.kept_voices().items():
        entries[voice_id] = _kept_voice_object(voice, _models_speaking(nodes))
    for entry in entries.values():
        entry["model"] = entry["models"][0] if entry["models"] else None
    return list(entries.values())


def _models_keeping(router: Router, voice_id: str) -> list[str]:
    kept = router.kept_voices().get(voice_id)
    return _models_speaking(kept[1] if kept else [])


def _models_speaking(nodes: list[NodeSession]) -> list[str]:
    """The names and aliases of the models on ``nodes`` that speak kept voices."""
    models: list[str] = []
    for node in nodes:
        for info in node.models.values():
            if info.clones:
                models += [m for m in (info.name, *info.aliases) if m not in models]
    return models


def _kept_voice_object(voice: KeptVoice, models: list[str]) -> dict[str, Any]:
    return {
        "id": voice.id,
        "object": "audio.voice",
        "name": voice.name,
        "type": "audio_sample",
        "created_at": voice.created_at,
        "language": voice.language,
        "consent": voice.consent,
        "models": models,
        "model": models[0] if models else None,
    }


async def list_audio_models(request: HttpRequest) -> JSONResponse:
    """``GET /v1/audio/models``: the speech models, as Open WebUI reads them (``models: [{id}]``),
    and in OpenAI's list shape."""
    created = request.app.state.started
    data = [
        {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "qwen3-tts",
            "root": info.name,
            "any_voice": info.any_voice,  # VoiceDesign: the voice is described in `instructions`
            "clones": info.clones,  # Base: speaks uploaded voices
        }
        for info in request.app.state.router.catalogue().values()
        for model_id in (info.name, *info.aliases)
    ]
    return JSONResponse({"object": "list", "data": data, "models": [{"id": m["id"], "name": m["id"]} for m in data]})


# --- through the tunnel -----------------------------------------------------------------------


def _cloners(router: Router) -> list[NodeSession]:
    nodes = [node for node in router.nodes if node.clones]
    if not nodes:
        raise ApiError(
            503,
            "No connected node keeps voices: that takes a node serving a Base model.",
            code="no_node_available",
        )
    return nodes


async def _everywhere(request: HttpRequest, make_call: Callable[[NodeSession], Call], body: bytes, nodes: list[NodeSession]) -> None:
    """Make the same call on every node in ``nodes`` at once. Succeeds if one node did it; else
    raises the nodes' refusal (a bad recording, say, which every node would refuse alike)."""
    config: RelayConfig = request.app.state.config
    if request.app.state.router.draining:
        raise ApiError(503, "This relay is shutting down; retry shortly.", code="relay_draining", retry_after=config.retry_after_seconds)
    if not nodes:
        raise ApiError(503, "No node that keeps it is connected right now.", code="no_node_available")
    outcomes = await asyncio.gather(*(_one(node, make_call(node), body, config) for node in nodes))
    if any(isinstance(outcome, Done) for outcome in outcomes):
        for node, outcome in zip(nodes, outcomes):
            if not isinstance(outcome, Done):
                log.warning("node %s did not keep the change: %s", node.name, outcome)
        return
    refusals = [outcome for outcome in outcomes if isinstance(outcome, Error)]
    if refusals:
        status, code = _NODE_ERRORS.get(refusals[0].code, (502, "node_error"))
        raise ApiError(status, refusals[0].message or "The node refused it.", code=code)
    raise ApiError(502, f"No node answered: {outcomes[0]}.", code="node_failed")


async def _one(node: NodeSession, call: Call, body: bytes, config: RelayConfig) -> Done | Error | str:
    try:
        return await node.call(call, body, timeout=config.first_audio_timeout)
    except NodeGone:
        return "the node disconnected"
    except TimeoutError:
        return "the node did not answer in time"


# --- fields -----------------------------------------------------------------------------------


def _take_rate(request: HttpRequest) -> None:
    rate = request.app.state.rate_limiter
    wait = rate.take(request.state.client)
    if wait:
        raise ApiError(
            429, f"Rate limit reached; retry in {retry_after(wait)} s.", code="rate_limit_exceeded", retry_after=retry_after(wait)
        )


def _text(form: dict[str, Any], key: str, max_chars: int, required: bool = True) -> str:
    value = form.get(key)
    if value is None or value == "":
        if required:
            raise bad_request(f"Missing required parameter: '{key}'.", param=key, code="missing_required_parameter")
        return ""
    if not isinstance(value, str):
        raise bad_request(f"Invalid type for '{key}': expected a string.", param=key, code="invalid_type")
    if len(value) > max_chars or not value.strip():
        raise bad_request(f"'{key}' must be text of 1 to {max_chars} characters.", param=key)
    return value


def _language(form: dict[str, Any], required: bool) -> str | None:
    value = _text(form, "language", 35, required=required)
    if value and not _LANGUAGE.fullmatch(value):
        raise bad_request(f"'language' must be a BCP 47 tag such as 'en-US', not {value[:40]!r}.", param="language")
    return value or None


def _file(form: dict[str, Any], key: str) -> bytes:
    data = form.get(key)
    if data is None:
        raise bad_request(f"Missing required parameter: '{key}' (a file).", param=key, code="missing_required_parameter")
    if not data:
        raise bad_request(f"'{key}' is an empty file.", param=key)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"'{key}' is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB.", param=key, code="file_too_large")
    return data


def _json_object(body: bytes, fields: tuple[str, ...]) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    for key in data:
        if key not in fields:
            raise bad_request(f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
    return data
