"""The tunnel's wire protocol, sans I/O: pure encoding, decoding and per-connection state.

A node dials out to the relay over one websocket and keeps it open; every request the relay
forwards travels over it, many at a time, each on its own stream id.

Handshake: the node proves it holds a node token without sending it, and no proof works twice.
  1. ``GET /v1/tunnel/challenge`` (plain HTTP, no credential) answers
     ``{"challenge": "<32 random bytes, base64url>", "expires_in": 30}``. The relay keeps the
     challenges it issued, each for 30 s and for one use, at most 4096 (the oldest are dropped).
  2. The websocket upgrade (``/v1/tunnel``, checked before the websocket is accepted) carries
       ``Sec-WebSocket-Protocol: qwen3-tts-tunnel.v<N>``: a relay that does not speak version N
         refuses with HTTP 426 and says which version it speaks (checked first, so an old node
         learns it must upgrade rather than that its token is wrong);
       ``Authorization: Tunnel-HMAC <challenge>:<proof>``, where proof is the lowercase hex
         HMAC-SHA256, keyed with the node token (UTF-8), of the subprotocol name, a line
         feed and the challenge (``tunnel.handshake.tunnel_proof``).
     The relay uses the challenge up on its first presentation, right or wrong. It refuses with
     HTTP 401 and an error ``code``: ``missing_node_credential`` (no or malformed header),
     ``invalid_challenge`` (never issued here, expired, or already used: fetch a new one and try
     again), ``invalid_node_token`` (the proof matches no configured token: do not retry).
  * A relay that is shutting down refuses with HTTP 503; the node tries again later.
  The challenge and the websocket must reach the same relay process (a node names each relay by
  its own address).

Frames after the handshake:
  * text frames: one JSON object each, ``{"type": ..., ...}``, at most ``MAX_FRAME_BYTES``;
  * binary frames: encoded audio for one stream, a 4-byte big-endian stream id followed by
    1 to ``MAX_AUDIO_PAYLOAD`` bytes, so a frame never exceeds 64 KiB.

Conversation:
  node  -> relay  hello    {node, models: [{name, aliases, voices, any_voice, clones}]}   first, and
                                                                          again whenever it changes
  node  -> relay  voices   {voices: [{id, name, created_at, language, consent}]}   the voices this
  node  -> relay  consents {consents: [{id, name, language, created_at}]}          node keeps, whole,
                                                                  after hello and after every change
  relay -> node   request  {id, request_id, model, voice, input, instructions, response_format, speed,
                            window, live}
  relay -> node   text     {id, text, done}   live requests: more of the text, while it is spoken;
                                              ``done`` ends it (at most MAX_LIVE_CHARS in all)
  node  -> relay  audio    (binary) ... then exactly one of
  node  -> relay  end      {id, input_tokens, output_tokens}
  node  -> relay  error    {id, code, message}
  relay -> node   credit   {id, size}   the client took ``size`` more bytes of this stream
  relay -> node   cancel   {id}         the client went away; the node stops generating
  either way      draining {}           the sender is shutting down: the relay sends no new
                                        requests; open streams run to their end

Calls (since version 4): the relay asks a node to keep or forget a voice or a consent recording.
  relay -> node   upload   {id, kind: voice|consent, object_id, name, created_at, size, language,
                            consent, ref_text}   then ``size`` bytes of the recording as binary
                            frames on the call's id (same framing as audio)
  relay -> node   forget   {id, kind, object_id}
  relay -> node   rename   {id, object_id, name}          a consent's label
  node  -> relay  done     {id}   or   error {id, code, message}   exactly one per call; a node
                            sends its new ``voices``/``consents`` list before ``done``
  node  -> relay  credit   {id, size}   the node took ``size`` more bytes of the upload

Flow control (since version 2): each stream has its own byte credit. It starts at the request's
``window``; every ``credit`` adds to it and every audio byte the node sends takes from it, so the
relay never holds more than ``window`` unforwarded bytes of a stream, and a client that reads
slowly holds back its own stream only. The relay grants credit as it hands audio to the client.
Audio beyond the credit is a protocol error. Uploads flow the other way under the same rule: the
relay may send ``UPLOAD_WINDOW`` bytes of a recording, then as much more as the node credits, so
a 10 MiB upload never sits in front of other streams' frames; more than ``size`` is an error.

Liveness is the websocket's own ping/pong, on both ends (see the README for the intervals).

A ``Connection`` holds one side's view of the streams so that out-of-order or malformed input is
caught here, in one place, and the asyncio code around it stays thin.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union, cast

PROTOCOL_VERSION = 4  # 2: per-stream credit, draining; 3: challenge-response handshake; 4: voices, live text
SUBPROTOCOL = f"qwen3-tts-tunnel.v{PROTOCOL_VERSION}"
MAX_FRAME_BYTES = 64 * 1024
_AUDIO_HEADER = struct.Struct(">I")
MAX_AUDIO_PAYLOAD = MAX_FRAME_BYTES - _AUDIO_HEADER.size
MAX_STREAM_ID = 2**32 - 1
MAX_CREDIT = 2**31  # bytes, for one window or grant
# A stream's window: what the relay holds at most for one slow client. It is many seconds of even
# raw PCM, so a client that keeps up never makes the node wait.
DEFAULT_WINDOW = 128 * 1024

RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MAX_INPUT_CHARS = 4096
MAX_INSTRUCTIONS_CHARS = 4096
MIN_SPEED, MAX_SPEED = 0.25, 4.0

# Why a node could not serve a request or a call; the relay maps each to an HTTP status.
ERROR_CODES = ("busy", "unknown_model", "unknown_voice", "invalid_request", "not_found", "internal_error")

MAX_NAME_CHARS = 128  # node, model, alias and voice names
MAX_MODELS = 64
MAX_NAMES = 1024  # aliases or voices of one model

MAX_LIVE_CHARS = 65536  # the whole text of one live request: what a node buffers at most for it
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # one recording, as OpenAI's API takes it
UPLOAD_WINDOW = 256 * 1024  # an upload's first credit, in bytes
MAX_KEPT = 64  # voices, or consents, one node keeps: each list fits one frame
MAX_ID_CHARS = 64  # ids of kept voices and consents
MAX_LANGUAGE_CHARS = 35  # a BCP 47 tag, or a Qwen language name
KINDS = ("voice", "consent")


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the connection should be closed."""


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    name: str
    aliases: tuple[str, ...] = ()
    voices: tuple[str, ...] = ()
    any_voice: bool = False  # VoiceDesign: the voice is described by `instructions`
    clones: bool = False  # Base: speaks the voices this node keeps (``VoiceList``)


@dataclass(frozen=True)
class Hello:
    node: str
    models: tuple[ModelInfo, ...]


@dataclass(frozen=True)
class KeptVoice:
    """A voice made from an uploaded recording, kept by a node."""

    id: str
    name: str
    created_at: int
    language: str | None = None
    consent: str | None = None  # the consent recording's id


@dataclass(frozen=True)
class Consent:
    """A consent recording, kept by a node."""

    id: str
    name: str
    language: str
    created_at: int


@dataclass(frozen=True)
class VoiceList:
    voices: tuple[KeptVoice, ...]


@dataclass(frozen=True)
class ConsentList:
    consents: tuple[Consent, ...]


@dataclass(frozen=True)
class Upload:
    """Keep a recording: a voice's sample or a consent; ``size`` bytes follow as ``Body`` frames."""

    id: int
    kind: str  # one of KINDS
    object_id: str
    name: str
    created_at: int
    size: int
    language: str | None = None
    consent: str | None = None  # voice: the consent's id
    ref_text: str | None = None  # voice: the words spoken in the sample (in-context cloning)


@dataclass(frozen=True)
class Body:
    """Bytes of an upload, relay to node (framed like audio)."""

    id: int
    data: bytes


@dataclass(frozen=True)
class Forget:
    id: int
    kind: str
    object_id: str


@dataclass(frozen=True)
class Rename:
    id: int
    object_id: str  # a consent
    name: str


@dataclass(frozen=True)
class Done:
    id: int


@dataclass(frozen=True)
class Request:
    id: int
    request_id: str
    model: str
    voice: str
    input: str
    instructions: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    window: int = DEFAULT_WINDOW  # the stream's first credit, in bytes
    live: bool = False  # the text is still being written: ``input`` is its start, ``Text`` the rest


@dataclass(frozen=True)
class Text:
    """More of a live request's text; ``done``: that was all of it."""

    id: int
    text: str
    done: bool = False


@dataclass(frozen=True)
class Cancel:
    id: int


@dataclass(frozen=True)
class Credit:
    id: int
    size: int


@dataclass(frozen=True)
class Draining:
    pass


@dataclass(frozen=True)
class Audio:
    id: int
    data: bytes


@dataclass(frozen=True)
class End:
    id: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Error:
    id: int
    code: str
    message: str


Message = Union[
    Hello, VoiceList, ConsentList, Request, Text, Credit, Cancel, Draining, Audio, End, Error, Upload, Body, Forget, Rename, Done
]
# Besides Draining, which either side may send, and Credit, which each sends for what it receives.
FromNode = Union[Hello, VoiceList, ConsentList, Audio, End, Error, Done, Credit]
FromRelay = Union[Request, Text, Credit, Cancel, Upload, Body, Forget, Rename]
Call = Union[Upload, Forget, Rename]
Frame = Union[str, bytes]

_FROM_NODE = (Hello, VoiceList, ConsentList, Audio, End, Error, Done, Credit, Draining)
_FROM_RELAY = (Request, Text, Credit, Cancel, Upload, Body, Forget, Rename, Draining)
_TYPE_NAMES = {
    Hello: "hello",
    VoiceList: "voices",
    ConsentList: "consents",
    Request: "request",
    Text: "text",
    Credit: "credit",
    Cancel: "cancel",
    Draining: "draining",
    End: "end",
    Error: "error",
    Upload: "upload",
    Forget: "forget",
    Rename: "rename",
    Done: "done",
}
_TYPES_BY_NAME = {name: cls for cls, name in _TYPE_NAMES.items()}


# --- encoding ---------------------------------------------------------------------------------


def encode(message: Message) -> Frame:
    """Encode a message as a websocket frame payload (bytes for audio, str for the rest)."""
    if isinstance(message, (Audio, Body)):
        return _AUDIO_HEADER.pack(message.id) + message.data
    body = {"type": _TYPE_NAMES[type(message)], **_fields(message)}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _fields(message: Message) -> dict[str, Any]:
    """A text message's wire fields, named here rather than taken from the dataclass, so that
    renaming an attribute cannot change the wire (the decoders below name them too)."""
    match message:
        case Hello():
            return {"node": message.node, "models": [_model_fields(m) for m in message.models]}
        case VoiceList():
            return {"voices": [_kept_voice_fields(v) for v in message.voices]}
        case ConsentList():
            return {"consents": [_consent_fields(c) for c in message.consents]}
        case Upload():
            return {
                "id": message.id,
                "kind": message.kind,
                "object_id": message.object_id,
                "name": message.name,
                "created_at": message.created_at,
                "size": message.size,
                "language": message.language,
                "consent": message.consent,
                "ref_text": message.ref_text,
            }
        case Forget():
            return {"id": message.id, "kind": message.kind, "object_id": message.object_id}
        case Rename():
            return {"id": message.id, "object_id": message.object_id, "name": message.name}
        case Done():
            return {"id": message.id}
        case Request():
            return {
                "id": message.id,
                "request_id": message.request_id,
                "model": message.model,
                "voice": message.voice,
                "input": message.input,
                "instructions": message.instructions,
                "response_format": message.response_format,
                "speed": message.speed,
                "window": message.window,
                "live": message.live,
            }
        case Text():
            return {"id": message.id, "text": message.text, "done": message.done}
        case Credit():
            return {"id": message.id, "size": message.size}
        case Cancel():
            return {"id": message.id}
        case Draining():
            return {}
        case End():
            return {"id": message.id, "input_tokens": message.input_tokens, "output_tokens": message.output_tokens}
        case Error():
            return {"id": message.id, "code": message.code, "message": message.message}
    raise TypeError(f"not a text message: {message!r}")


def _model_fields(model: ModelInfo) -> dict[str, Any]:
    return {
        "name": model.name,
        "aliases": list(model.aliases),
        "voices": list(model.voices),
        "any_voice": model.any_voice,
        "clones": model.clones,
    }


def _kept_voice_fields(voice: KeptVoice) -> dict[str, Any]:
    return {"id": voice.id, "name": voice.name, "created_at": voice.created_at, "language": voice.language, "consent": voice.consent}


def _consent_fields(consent: Consent) -> dict[str, Any]:
    return {"id": consent.id, "name": consent.name, "language": consent.language, "created_at": consent.created_at}


# --- decoding and validation ------------------------------------------------------------------


def decode(frame: Frame) -> Message:
    """Decode and fully validate one frame. Raises ProtocolError for anything malformed."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return _decode_audio(bytes(frame))
    if not isinstance(frame, str):
        raise ProtocolError("frame is neither text nor binary")
    try:
        size = len(frame.encode())
    except UnicodeEncodeError:  # lone surrogates: a str, but not text any wire could carry
        raise ProtocolError("text frame is not valid UTF-8") from None
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"text frame larger than {MAX_FRAME_BYTES} bytes")
    try:
        body = json.loads(frame)
        # JSON escapes can smuggle in lone surrogates, which are not text and cannot be re-encoded.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise ProtocolError("text frame is not valid JSON in UTF-8") from None
    if not isinstance(body, dict):
        raise ProtocolError("text frame is not a JSON object")
    fields = _Fields(body)
    cls = _TYPES_BY_NAME.get(fields.pop_str("type", 16))
    if cls is None:
        raise ProtocolError(f"unknown message type {body.get('type')!r}")
    message = _DECODERS[cls](fields)
    fields.finish(_TYPE_NAMES[cls])
    return message


def _decode_audio(frame: bytes) -> Audio:
    if len(frame) <= _AUDIO_HEADER.size:
        raise ProtocolError("audio frame carries no audio")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"audio frame larger than {MAX_FRAME_BYTES} bytes")
    (stream_id,) = _AUDIO_HEADER.unpack_from(frame)
    return Audio(stream_id, frame[_AUDIO_HEADER.size :])


class _Fields:
    """Takes typed fields out of a decoded JSON object; whatever is left over is an error."""

    def __init__(self, body: dict) -> None:
        self.body = dict(body)

    def _pop(self, key: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
        if key not in self.body:
            if optional:
                return None
            raise ProtocolError(f"missing field {key!r}")
        value = self.body.pop(key)
        if value is None and optional:
            return None
        # bool is an int in Python, but never a valid number on this wire
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ProtocolError(f"field {key!r} has the wrong type")
        return value

    def pop_str(self, key: str, max_chars: int, empty: bool = False) -> str:
        value: str = self._pop(key, (str,))
        return self._checked_str(key, value, max_chars, empty)

    def pop_optional_str(self, key: str, max_chars: int, empty: bool = False) -> str | None:
        value: str | None = self._pop(key, (str,), optional=True)
        return None if value is None else self._checked_str(key, value, max_chars, empty)

    def pop_nullable_str(self, key: str, max_chars: int) -> str | None:
        """A field that must be present and may be null (every optional field since version 4)."""
        if key not in self.body:
            raise ProtocolError(f"missing field {key!r}")
        return self.pop_optional_str(key, max_chars)

    @staticmethod
    def _checked_str(key: str, value: str, max_chars: int, empty: bool) -> str:
        if len(value) > max_chars or (not value and not empty):
            raise ProtocolError(f"field {key!r} is empty or longer than {max_chars} characters")
        return value

    def pop_int(self, key: str, low: int, high: int) -> int:
        value = self._pop(key, (int,))
        if not low <= value <= high:
            raise ProtocolError(f"field {key!r} is out of range")
        return value

    def pop_float(self, key: str, low: float, high: float) -> float:
        value = self._pop(key, (int, float))
        if not low <= value <= high:  # also false for NaN; exact for huge integers
            raise ProtocolError(f"field {key!r} is out of range")
        return float(value)

    def pop_bool(self, key: str) -> bool:
        return self._pop(key, (bool,))

    def pop_names(self, key: str) -> tuple[str, ...]:
        values = self._pop(key, (list,))
        if len(values) > MAX_NAMES:
            raise ProtocolError(f"field {key!r} lists too many names")
        for value in values:
            if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
                raise ProtocolError(f"field {key!r} holds an invalid name")
        return tuple(values)

    def pop_objects(self, key: str, max_items: int) -> list[_Fields]:
        values = self._pop(key, (list,))
        if len(values) > max_items or not all(isinstance(v, dict) for v in values):
            raise ProtocolError(f"field {key!r} must be a list of at most {max_items} objects")
        return [_Fields(v) for v in values]

    def finish(self, what: str) -> None:
        if self.body:
            raise ProtocolError(f"unexpected fields in {what}: {sorted(self.body)}")


def _decode_model(f: _Fields) -> ModelInfo:
    model = ModelInfo(
        name=f.pop_str("name", MAX_NAME_CHARS),
        aliases=f.pop_names("aliases"),
        voices=f.pop_names("voices"),
        any_voice=f.pop_bool("any_voice"),
        clones=f.pop_bool("clones"),
    )
    f.finish("model")
    return model


def _decode_kept_voice(f: _Fields) -> KeptVoice:
    voice = KeptVoice(
        id=f.pop_str("id", MAX_ID_CHARS),
        name=f.pop_str("name", MAX_NAME_CHARS),
        created_at=f.pop_int("created_at", 0, 2**63),
        language=f.pop_nullable_str("language", MAX_LANGUAGE_CHARS),
        consent=f.pop_nullable_str("consent", MAX_ID_CHARS),
    )
    f.finish("voice")
    return voice


def _decode_consent(f: _Fields) -> Consent:
    consent = Consent(
        id=f.pop_str("id", MAX_ID_CHARS),
        name=f.pop_str("name", MAX_NAME_CHARS),
        language=f.pop_str("language", MAX_LANGUAGE_CHARS),
        created_at=f.pop_int("created_at", 0, 2**63),
    )
    f.finish("consent")
    return consent


def _kind(f: _Fields) -> str:
    kind = f.pop_str("kind", 16)
    if kind not in KINDS:
        raise ProtocolError(f"unknown kind {kind!r}")
    return kind


def _decode_upload(f: _Fields) -> Upload:
    return Upload(
        id=f.pop_int("id", 0, MAX_STREAM_ID),
        kind=_kind(f),
        object_id=f.pop_str("object_id", MAX_ID_CHARS),
        name=f.pop_str("name", MAX_NAME_CHARS),
        created_at=f.pop_int("created_at", 0, 2**63),
        size=f.pop_int("size", 1, MAX_UPLOAD_BYTES),
        language=f.pop_nullable_str("language", MAX_LANGUAGE_CHARS),
        consent=f.pop_nullable_str("consent", MAX_ID_CHARS),
        ref_text=f.pop_nullable_str("ref_text", MAX_INPUT_CHARS),
    )


def _decode_hello(f: _Fields) -> Hello:
    node = f.pop_str("node", MAX_NAME_CHARS)
    return Hello(node=node, models=tuple(_decode_model(m) for m in f.pop_objects("models", MAX_MODELS)))


def _decode_request(f: _Fields) -> Request:
    response_format = f.pop_str("response_format", 8)
    if response_format not in RESPONSE_FORMATS:
        raise ProtocolError(f"unknown response_format {response_format!r}")
    return Request(
        id=f.pop_int("id", 0, MAX_STREAM_ID),
        request_id=f.pop_str("request_id", MAX_NAME_CHARS),
        model=f.pop_str("model", MAX_NAME_CHARS),
        voice=f.pop_str("voice", MAX_NAME_CHARS),
        input=f.pop_str("input", MAX_INPUT_CHARS),
        instructions=f.pop_optional_str("instructions", MAX_INSTRUCTIONS_CHARS, empty=True),
        response_format=response_format,
        speed=f.pop_float("speed", MIN_SPEED, MAX_SPEED),
        window=f.pop_int("window", 1, MAX_CREDIT),
        live=f.pop_bool("live"),
    )


def _decode_text(f: _Fields) -> Text:
    text = Text(id=f.pop_int("id", 0, MAX_STREAM_ID), text=f.pop_str("text", MAX_INPUT_CHARS, empty=True), done=f.pop_bool("done"))
    if not text.text and not text.done:
        raise ProtocolError("a text frame carries text, or ends the text")
    return text


def _decode_error(f: _Fields) -> Error:
    error = Error(
        id=f.pop_int("id", 0, MAX_STREAM_ID),
        code=f.pop_str("code", 32),
        message=f.pop_str("message", 1024, empty=True),
    )
    if error.code not in ERROR_CODES:
        raise ProtocolError(f"unknown error code {error.code!r}")
    return error


_DECODERS: dict[type, Callable[[_Fields], Message]] = {
    Hello: _decode_hello,
    VoiceList: lambda f: VoiceList(tuple(_decode_kept_voice(v) for v in f.pop_objects("voices", MAX_KEPT))),
    ConsentList: lambda f: ConsentList(tuple(_decode_consent(c) for c in f.pop_objects("consents", MAX_KEPT))),
    Upload: _decode_upload,
    Forget: lambda f: Forget(id=f.pop_int("id", 0, MAX_STREAM_ID), kind=_kind(f), object_id=f.pop_str("object_id", MAX_ID_CHARS)),
    Rename: lambda f: Rename(
        id=f.pop_int("id", 0, MAX_STREAM_ID), object_id=f.pop_str("object_id", MAX_ID_CHARS), name=f.pop_str("name", MAX_NAME_CHARS)
    ),
    Done: lambda f: Done(id=f.pop_int("id", 0, MAX_STREAM_ID)),
    Request: _decode_request,
    Text: _decode_text,
    Credit: lambda f: Credit(id=f.pop_int("id", 0, MAX_STREAM_ID), size=f.pop_int("size", 1, MAX_CREDIT)),
    Cancel: lambda f: Cancel(id=f.pop_int("id", 0, MAX_STREAM_ID)),
    Draining: lambda f: Draining(),
    End: lambda f: End(
        id=f.pop_int("id", 0, MAX_STREAM_ID),
        input_tokens=f.pop_int("input_tokens", 0, 2**31),
        output_tokens=f.pop_int("output_tokens", 0, 2**31),
    ),
    Error: _decode_error,
}


# --- per-connection state ---------------------------------------------------------------------


@dataclass
class _Call:
    """A call in progress: upload bytes still to come, and how many of them may be sent now."""

    remaining: int = 0
    credit: int = 0


@dataclass
class Connection:
    """One side's view of a tunnel: which messages may come next, which streams and calls are
    open, and how many bytes each may still carry.

    ``send`` encodes what this side says (a ValueError for what this side must not say: a bug in
    the caller); ``receive`` decodes what the peer said and returns it, or None for a frame that
    needs no action: one that arrived after this side cancelled its stream, or a cancel or credit
    that crossed the stream's end on the wire (expected races).
    """

    role: Literal["relay", "node"]
    hello_done: bool = False
    # stream id -> credit: audio bytes the node may still send on it, for streams not yet ended
    open_streams: dict[int, int] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)  # relay: cancelled, node may still be talking
    calls: dict[int, _Call] = field(default_factory=dict)  # not yet answered with done or error
    live_text: dict[int, int] = field(default_factory=dict)  # live stream -> characters of text so far, until done
    draining_sent: bool = False
    peer_draining: bool = False
    next_id: int = 1

    def new_stream_id(self) -> int:
        """An id for a new stream or call (they share one space)."""
        stream_id = self.next_id
        self.next_id = 1 if stream_id >= MAX_STREAM_ID else stream_id + 1
        return stream_id

    def credit(self, stream_id: int) -> int:
        """Bytes that may still be sent on ``stream_id`` now: audio by the node on a stream, upload
        bytes by the relay on a call (0 once it has ended)."""
        if stream_id in self.calls:
            return min(self.calls[stream_id].credit, self.calls[stream_id].remaining)
        return self.open_streams.get(stream_id, 0)

    def send(self, message: Message) -> Frame:
        allowed = _FROM_RELAY if self.role == "relay" else _FROM_NODE
        if not isinstance(message, allowed):
            raise ValueError(f"a {self.role} does not send {type(message).__name__}")
        if isinstance(message, Draining):
            self.draining_sent = True
        elif isinstance(message, Hello):
            self.hello_done = True
        elif isinstance(message, (Request, Upload, Forget, Rename)):
            if self.draining_sent or self.peer_draining:
                raise ValueError("no new requests once either side is draining")
            if isinstance(message, Request):
                self._open(message, ValueError)
            else:
                self.calls[message.id] = _upload_state(message)
        elif isinstance(message, Text):
            if message.id not in self.open_streams:  # it ended meanwhile: the node wants no more
                raise ValueError(f"stream {message.id} is not open")
            self._more_text(message, ValueError)
        elif isinstance(message, Credit):
            self._grant(message, upload=self.role == "node", error=ValueError)
        elif isinstance(message, Cancel):
            if message.id in self.open_streams:
                del self.open_streams[message.id]
                self.live_text.pop(message.id, None)
                self.cancelled.add(message.id)
        elif isinstance(message, (Audio, Body)):
            if not 0 < len(message.data) <= MAX_AUDIO_PAYLOAD:
                raise ValueError(f"a data frame carries 1 to {MAX_AUDIO_PAYLOAD} bytes, not {len(message.data)}")
            if len(message.data) > self.credit(message.id):
                raise ValueError(f"stream {message.id} has {self.credit(message.id)} bytes of credit, not {len(message.data)}")
            self._take(message.id, len(message.data))
        elif isinstance(message, (End, Error, Done)):
            self.open_streams.pop(message.id, None)
            self.live_text.pop(message.id, None)
            self.calls.pop(message.id, None)
        return encode(message)

    def _open(self, request: Request, error: type[Exception]) -> None:
        if request.live and len(request.input) > MAX_LIVE_CHARS:
            raise error(f"stream {request.id}: live text beyond {MAX_LIVE_CHARS} characters")
        self.open_streams[request.id] = request.window
        if request.live:
            self.live_text[request.id] = len(request.input)

    def _more_text(self, text: Text, error: type[Exception]) -> None:
        """Count ``text`` against its live stream: only while its text is open, MAX_LIVE_CHARS in all."""
        if text.id not in self.live_text:
            raise error(f"stream {text.id} takes no more text")
        self.live_text[text.id] += len(text.text)
        if self.live_text[text.id] > MAX_LIVE_CHARS:
            raise error(f"stream {text.id}: live text beyond {MAX_LIVE_CHARS} characters")
        if text.done:
            del self.live_text[text.id]

    def receive(self, frame: Frame) -> Message | None:
        message = decode(frame)
        if self.role == "node" and isinstance(message, Audio):  # binary frames to a node carry uploads
            message = Body(message.id, message.data)
        expected = _FROM_NODE if self.role == "relay" else _FROM_RELAY
        if not isinstance(message, expected):
            raise ProtocolError(f"{type(message).__name__} is not sent to a {self.role}")
        if isinstance(message, Draining):
            self.peer_draining = True
            return message
        if self.role == "relay":  # the check above made it one of FromNode, or of FromRelay
            return self._receive_at_relay(cast(FromNode, message))
        return self._receive_at_node(cast(FromRelay, message))

    def _grant(self, credit: Credit, upload: bool, error: type[Exception]) -> None:
        """Add ``credit`` to a call's upload (granted by the node) or a stream's audio (by the relay)."""
        if upload:
            if credit.id not in self.calls:
                raise error(f"call {credit.id} is not open")
            self.calls[credit.id].credit += credit.size
        else:
            if credit.id not in self.open_streams:
                raise error(f"stream {credit.id} is not open")
            self.open_streams[credit.id] += credit.size

    def _take(self, stream_id: int, size: int) -> None:
        if stream_id in self.calls:
            self.calls[stream_id].credit -= size
            self.calls[stream_id].remaining -= size
        else:
            self.open_streams[stream_id] -= size

    def _receive_at_relay(self, message: FromNode) -> Message | None:
        if isinstance(message, Hello):
            self.hello_done = True
            return message
        if not self.hello_done:
            raise ProtocolError("the node must say hello first")
        if isinstance(message, (VoiceList, ConsentList)):
            return message
        if isinstance(message, Credit):
            self._grant(message, upload=True, error=ProtocolError)
            return message
        if isinstance(message, Done) or (isinstance(message, Error) and message.id in self.calls):
            if message.id not in self.calls:
                raise ProtocolError(f"call {message.id} is not open")
            del self.calls[message.id]
            return message
        assert isinstance(message, (Audio, End, Error))
        stream_id = message.id
        if stream_id in self.cancelled:
            if isinstance(message, (End, Error)):
                self.cancelled.discard(stream_id)
            return None
        if stream_id not in self.open_streams:
            raise ProtocolError(f"stream {stream_id} is not open")
        if isinstance(message, Audio):
            if len(message.data) > self.open_streams[stream_id]:
                raise ProtocolError(f"stream {stream_id} sent more audio than its credit")
            self.open_streams[stream_id] -= len(message.data)
        else:
            del self.open_streams[stream_id]
        return message

    def _receive_at_node(self, message: FromRelay) -> Message | None:
        if isinstance(message, (Request, Upload, Forget, Rename)):
            if self.peer_draining:
                raise ProtocolError("a request after the relay said it is draining")
            if message.id in self.open_streams or message.id in self.calls:
                raise ProtocolError(f"stream {message.id} is already open")
            if isinstance(message, Request):
                self._open(message, ProtocolError)
            else:
                self.calls[message.id] = _upload_state(message)
            return message
        if isinstance(message, Body):
            if len(message.data) > self.credit(message.id):
                raise ProtocolError(f"call {message.id} sent more upload than its credit or its size")
            self._take(message.id, len(message.data))
            return message
        # A cancel, credit or text may cross the node's own end or error on the wire: nothing to do.
        if message.id not in self.open_streams:
            return None
        if isinstance(message, Credit):
            self.open_streams[message.id] += message.size
        elif isinstance(message, Text):
            self._more_text(message, ProtocolError)
        elif isinstance(message, Cancel):
            self.live_text.pop(message.id, None)
        return message


def _upload_state(call: Upload | Forget | Rename) -> _Call:
    return _Call(call.size, UPLOAD_WINDOW) if isinstance(call, Upload) else _Call()
