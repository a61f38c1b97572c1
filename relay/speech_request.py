"""The body of ``POST /v1/audio/speech``, validated the way OpenAI's API validates it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tunnel.protocol import MAX_INPUT_CHARS, MAX_INSTRUCTIONS_CHARS, MAX_NAME_CHARS, MAX_SPEED, MIN_SPEED, RESPONSE_FORMATS

from .errors import bad_request

if TYPE_CHECKING:
    from .tunnel_server import Stream

CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
STREAM_FORMATS = ("audio", "sse")
MAX_BODY_BYTES = 64 * 1024

_FIELDS = ("model", "input", "voice", "instructions", "response_format", "speed", "stream_format")


@dataclass(frozen=True)
class SpeechRequest:
    model: str
    input: str
    voice: str
    instructions: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    # The text is still being written (the live websocket): ``input`` is what there is when a node
    # is asked; the rest reaches that node as it comes.
    live: LiveInput | None = None


class LiveInput(Protocol):
    @property
    def text(self) -> str: ...

    def attach(self, stream: Stream) -> None:
        """The request was sent on ``stream`` with ``text`` as it was: send it the rest."""


def parse_speech_request(body: bytes) -> SpeechRequest:
    """Parse and validate a request body; raise ApiError(400) naming the offending parameter."""
    try:
        data = json.loads(body)
        # JSON escapes can smuggle in lone surrogates, which are not text and cannot be encoded.
        json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise bad_request("The request body is not valid JSON in UTF-8.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0], code="unknown_parameter")
    # OpenAI treats an explicit null like an omitted optional field.
    data = {key: value for key, value in data.items() if value is not None}

    model = _string(data, "model", MAX_NAME_CHARS)
    text = _string(data, "input", MAX_INPUT_CHARS)
    if not text.strip():
        raise bad_request("'input' must contain text to speak.", param="input")
    voice = _voice(data)
    instructions = _string(data, "instructions", MAX_INSTRUCTIONS_CHARS, required=False, empty=True)
    response_format = _choice(data, "response_format", RESPONSE_FORMATS, "mp3")
    stream_format = _choice(data, "stream_format", STREAM_FORMATS, "audio")
    speed = _speed(data)
    return SpeechRequest(model, text, voice, instructions or None, response_format, speed, stream_format)


def _string(data: dict, key: str, max_chars: int, *, required: bool = True, empty: bool = False) -> str:
    if key not in data:
        if required:
            raise bad_request(f"Missing required parameter: '{key}'.", param=key, code="missing_required_parameter")
        return ""
    value = data[key]
    if not isinstance(value, str):
        raise bad_request(f"Invalid type for '{key}': expected a string.", param=key, code="invalid_type")
    if not value and not empty:
        raise bad_request(f"'{key}' must not be empty.", param=key)
    if len(value) > max_chars:
        raise bad_request(f"'{key}' is longer than the maximum of {max_chars} characters.", param=key, code="string_above_max_length")
    return value


def _voice(data: dict) -> str:
    value = data.get("voice")
    if isinstance(value, dict):
        if set(value) != {"id"} or not isinstance(value["id"], str):
            raise bad_request("'voice' as an object takes exactly one field, 'id', a string.", param="voice", code="invalid_type")
        data = {"voice": value["id"]}
    return _string(data, "voice", MAX_NAME_CHARS)


def _choice(data: dict, key: str, choices: tuple[str, ...], default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise bad_request(f"Invalid type for '{key}': expected a string.", param=key, code="invalid_type")
    if value not in choices:
        raise bad_request(f"Invalid value for '{key}': {value!r}. Supported values are: {', '.join(choices)}.", param=key)
    return value


def _speed(data: dict) -> float:
    value = data.get("speed", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request("Invalid type for 'speed': expected a number.", param="speed", code="invalid_type")
    if not MIN_SPEED <= value <= MAX_SPEED:  # also false for NaN; exact for huge integers
        raise bad_request(f"'speed' must be between {MIN_SPEED} and {MAX_SPEED}.", param="speed")
    return float(value)
