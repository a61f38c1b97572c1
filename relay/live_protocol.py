"""The live text websocket's messages (``/v1/audio/speech/stream``), sans I/O: vLLM-Omni's
streaming speech protocol, so its clients work unchanged.

Client -> relay, JSON text messages:
  ``{"type": "session.config", ...}``  first; the speech request's fields (``model``, ``voice`` or
        ``speaker``, ``response_format``, ``speed``, ``instructions``) and how the text is cut
        into utterances: ``split_granularity`` ``none`` (default: everything up to
        ``input.done`` is one utterance, spoken once it is done), ``sentence``, ``clause`` (each
        spoken as soon as it is complete), or ``continuous`` (everything up to ``input.done`` is
        one utterance, spoken while it is being written; vLLM-Omni's ``streaming_mode:
        "token_level"``). Other vLLM-Omni fields are accepted and ignored. It may be sent again
        between utterances.
  ``{"type": "input.text", "text": ...}``  any number
  ``{"type": "input.done"}``  ends the utterance(s) so far; the session stays open
  ``{"type": "session.close"}``
Relay -> client: ``audio.start`` {utterance_index, sentence_index, sentence_text, format,
  sample_rate, channels}, the audio as binary messages (the requested format, streamed),
  ``audio.done`` {utterance_index, sentence_index, total_bytes, error}, after each
  ``input.done`` ``session.done`` {utterance_index, total_sentences}, and ``error`` {message,
  code}.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tunnel.protocol import MAX_INPUT_CHARS, MAX_INSTRUCTIONS_CHARS, MAX_NAME_CHARS, MAX_SPEED, MIN_SPEED, RESPONSE_FORMATS

MAX_MESSAGE_BYTES = 32 * 1024  # one client message
GRANULARITIES = ("none", "sentence", "clause", "continuous")
_STREAMING_MODES = {"sentence": "sentence", "sentence_commit": "sentence", "token_level": "continuous"}  # vLLM-Omni branches


class LiveError(Exception):
    """A client message that cannot be used; ``message`` is sent back in an ``error`` event."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class SessionConfig:
    model: str = "tts-1"
    voice: str = "alloy"
    response_format: str = "wav"  # vLLM-Omni's default
    speed: float = 1.0
    instructions: str | None = None
    granularity: str = "none"


@dataclass(frozen=True)
class InputText:
    text: str


@dataclass(frozen=True)
class InputDone:
    pass


@dataclass(frozen=True)
class SessionClose:
    pass


ClientMessage = SessionConfig | InputText | InputDone | SessionClose


def parse_message(raw: str | bytes | None) -> ClientMessage:
    """One client message, validated; raises LiveError."""
    if not isinstance(raw, str):
        raise LiveError("Messages must be JSON text, not binary.")
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
        raise LiveError(f"A message is larger than {MAX_MESSAGE_BYTES} bytes.", "message_too_large")
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode()  # no lone surrogates
    except (ValueError, RecursionError):
        raise LiveError("Invalid JSON message.", "invalid_json") from None
    if not isinstance(data, dict):
        raise LiveError("WebSocket messages must be JSON objects.", "invalid_json")
    kind = data.get("type")
    if kind == "session.config":
        return _config(data)
    if kind == "input.text":
        text = data.get("text", "")
        if not isinstance(text, str):
            raise LiveError("input.text requires a string value.")
        if len(text) > MAX_INPUT_CHARS:
            raise LiveError(f"input.text holds more than {MAX_INPUT_CHARS} characters.", "message_too_large")
        return InputText(text)
    if kind == "input.done":
        return InputDone()
    if kind == "session.close":
        return SessionClose()
    raise LiveError(f"Unknown message type: {str(kind)[:40]}")


def _config(data: dict[str, Any]) -> SessionConfig:
    defaults = SessionConfig()
    voice = data.get("voice", data.get("speaker"))
    granularity = data.get("split_granularity")
    if granularity is None and data.get("streaming_mode") is not None:
        granularity = _STREAMING_MODES.get(data["streaming_mode"], data["streaming_mode"])
    config = SessionConfig(
        model=_text(data.get("model"), "model", MAX_NAME_CHARS) or defaults.model,
        voice=_voice(voice) or defaults.voice,
        response_format=_choice(data.get("response_format"), "response_format", RESPONSE_FORMATS) or defaults.response_format,
        speed=_speed(data.get("speed")),
        instructions=_text(data.get("instructions"), "instructions", MAX_INSTRUCTIONS_CHARS) or None,
        granularity=_choice(granularity, "split_granularity", GRANULARITIES) or defaults.granularity,
    )
    return config


def _text(value: Any, name: str, max_chars: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_chars:
        raise LiveError(f"Invalid session config: '{name}' must be a string of at most {max_chars} characters.")
    return value


def _voice(value: Any) -> str | None:
    if isinstance(value, dict) and set(value) == {"id"}:
        value = value["id"]
    return _text(value, "voice", MAX_NAME_CHARS)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise LiveError(f"Invalid session config: '{name}' must be one of {', '.join(choices)}.")
    return str(value)


def _speed(value: Any) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_SPEED <= value <= MAX_SPEED:
        raise LiveError(f"Invalid session config: 'speed' must be a number from {MIN_SPEED} to {MAX_SPEED}.")
    return float(value)


# --- cutting text into utterances ---------------------------------------------------------------

_LATIN_ENDS = ".!?"  # end a sentence when whitespace follows (not inside 3.14)
_SCRIPT_ENDS = "。！？…।॥؟"  # end a sentence at once
_CLAUSE_ENDS = ",;，；،"


class Splitter:
    """Text in, complete sentences (or clauses) out, as vLLM-Omni cuts them: Latin ``.!?`` when
    whitespace follows, other scripts' terminators at once; clauses also at commas and
    semicolons. ``flush`` gives what is left."""

    def __init__(self, granularity: str) -> None:
        ends = _SCRIPT_ENDS + (_CLAUSE_ENDS if granularity == "clause" else "")
        self._cut = re.compile(rf"(?<=[{re.escape(_LATIN_ENDS)}])\s+|(?<=[{re.escape(ends)}])")
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        units = []
        start = 0
        for match in self._cut.finditer(self._buffer):
            unit = self._buffer[start : match.start()].strip()
            if unit:
                units.append(unit)
            start = match.end()
        self._buffer = self._buffer[start:]
        return units

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []
