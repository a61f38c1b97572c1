"""Property-based fuzzing of the relay's doors: the speech API and the node tunnel.

The relay app runs in a thread of this process, served by uvicorn exactly as ``python -m relay``
serves it (``relay.__main__.server_config``), so that its event loop's tasks can be counted; a
real node with the synthetic engine is dialled in. Hypothesis sends malformed, oversized and
out-of-order input: odd JSON bodies, odd headers, raw HTTP with lying lengths and pipelined
garbage, and broken tunnel frames. Every answer must be the one the relay's own validation
predicts: an OpenAI-shaped JSON error with a 4xx, or a 200 audio stream for valid input; never a
500, never a hang. A broken tunnel is closed with 1002 and the reason of the first frame the
protocol refuses. After each test the relay is where it started: as many asyncio tasks and open
file descriptors, nothing logged at ERROR, and it still serves a request end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Iterator

import httpx
import pytest
from fuzz_strategies import FUZZ, garbage, hellos, json_values, messages
from harness import API_KEY, RELAY_ENV, Node, Relay, free_port, synthetic_models
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from relay.__main__ import server_config
from relay.app import create_app
from relay.config import RelayConfig
from relay.drain import DrainingServer
from relay.errors import ApiError
from relay.speech_request import CONTENT_TYPES, MAX_BODY_BYTES, parse_speech_request
from tunnel.credentials import bearer_token
from tunnel.protocol import MAX_FRAME_BYTES, RESPONSE_FORMATS, SUBPROTOCOL, Connection, Hello, ModelInfo, ProtocolError, encode

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GOOD = {"model": "tts-1", "input": "Hi", "voice": "alloy", "response_format": "pcm"}
FRAME_BYTES = 1920 * 2  # one synthetic 80 ms frame as 16-bit pcm
MODELS, VOICES = {"tts-1", "tone"}, {"alloy", "tone"}
DOCUMENTED_FIELDS = {"model", "input", "voice", "instructions", "response_format", "speed", "stream_format"}  # README
WS_MAX_SIZE = MAX_FRAME_BYTES + 1024  # as relay.__main__.server_config sets it


class InProcessRelay(Relay):
    """The relay served by uvicorn in a thread of this process. harness.Relay's helpers (models,
    wait_for_models, tunnel_headers) and ``with`` work on it unchanged; it starts no subprocess."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tunnel_url = f"ws://127.0.0.1:{self.port}/v1/tunnel"
        # No pings from the relay: they draw from the random module in its thread, which Hypothesis
        # would take for a strategy using it.
        config = RelayConfig.from_env({**RELAY_ENV, "RELAY_PING_INTERVAL": "3600"})
        app = create_app(config)
        self.server = DrainingServer(server_config(app, config, "127.0.0.1", self.port, "warning"), app.state.router, config.drain_grace)
        self.errors = _ErrorLog()  # after server_config: uvicorn configures its loggers there
        for name in ("uvicorn", "relay"):
            logging.getLogger(name).addHandler(self.errors)
        self.thread = threading.Thread(target=self.server.run, name="relay", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the in-process relay did not start"
            time.sleep(0.02)

    def tasks(self) -> int:
        """Tasks on the relay's event loop, not counting the one that counts them."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return asyncio.run_coroutine_threadsafe(count(), self.server._loop).result(10)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        for name in ("uvicorn", "relay"):
            logging.getLogger(name).removeHandler(self.errors)


class _ErrorLog(logging.Handler):
    """What the relay logs at ERROR or above: an unhandled exception in the app shows up here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not _uvicorn_quirk(record):
            self.records.append(f"{record.name}: {record.getMessage()} {record.exc_info[1] if record.exc_info else ''}")


def _uvicorn_quirk(record: logging.LogRecord) -> bool:
    """Two things uvicorn itself logs at ERROR, with a traceback, that are not the relay failing.

    A text frame that is not UTF-8: uvicorn closes the websocket with 1007, as it should.
    A request whose body is malformed HTTP (say, a bad chunk size) arriving in the same packet as
    its head, when the app answers without reading the body (401, 404, 405): uvicorn has already
    answered 400 and closed, but its h11 connection refuses the app's response instead of
    dropping it. The client gets the 400; nothing leaks (the fixture checks that).
    """
    error = record.exc_info[1] if record.exc_info else None
    return record.getMessage() == "Invalid UTF-8 sequence received from client." or (
        type(error).__name__ == "LocalProtocolError" and "state=MUST_CLOSE" in str(error)
    )


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    # Several streams at once and a queue, so that a valid request is never refused as busy
    # while the node stops one the previous example hung up on.
    with InProcessRelay() as relay, Node(tmp, relay, synthetic_models(max_queue=8, max_batch=4)) as node:
        relay.wait_for_models(MODELS, node=node, timeout=60)
        yield relay


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def steady(relay: InProcessRelay) -> tuple[int, int]:
    """(tasks, file descriptors) once they stop moving: the same twice in a row."""
    last = None
    for _ in range(50):
        now = (relay.tasks(), open_fds())
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    return now


def assert_serves(relay: InProcessRelay) -> None:
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{relay.url}/health").status_code == 200
        response = client.post(f"{relay.url}/v1/audio/speech", json=GOOD, headers=AUTH)
        assert response.status_code == 200 and len(response.content) == 2 * FRAME_BYTES, response.text[:300]
        assert client.get(f"{relay.url}/ready").json()["nodes"] == 1  # the real node, still there


@contextlib.contextmanager
def leaves_no_trace(relay: InProcessRelay) -> Iterator[None]:
    """Around a fuzzing round: no task or file descriptor leaked, nothing logged at ERROR."""
    tasks, fds = steady(relay)
    relay.errors.records.clear()
    yield
    deadline = time.monotonic() + 15  # connections the fuzzer dropped take a moment to be noticed
    while (relay.tasks() > tasks or open_fds() > fds) and time.monotonic() < deadline:
        time.sleep(0.1)
    now_tasks, now_fds = relay.tasks(), open_fds()
    assert now_tasks <= tasks and now_fds <= fds, f"leaked: {now_tasks} tasks (was {tasks}), {now_fds} fds (was {fds})"
    assert not relay.errors.records, relay.errors.records[:5]


@pytest.fixture(autouse=True)
def left_as_found(relay):
    """Around each fuzzing round: nothing leaked or crashed, still serving."""
    assert_serves(relay)  # warm: whatever the first request sets up lazily is not a leak
    with leaves_no_trace(relay):
        yield
    assert_serves(relay)


# --- what the relay should answer ---------------------------------------------------------------


def predicted(body: bytes) -> tuple[int, str | None]:
    """Status and error code for a request with a valid key: the relay's own validation, and the
    one node's models and voices."""
    if len(body) > MAX_BODY_BYTES:
        return 413, "request_too_large"
    try:
        speech = parse_speech_request(body)
    except ApiError as error:
        return error.status, error.code
    # What the README promises of an accepted body, checked apart from the relay's parser, which
    # this test otherwise trusts to say what is valid.
    data = {key: value for key, value in json.loads(body).items() if value is not None}
    assert set(data) <= DOCUMENTED_FIELDS and {"model", "input", "voice"} <= set(data), data
    assert isinstance(data["input"], str) and 0 < len(data["input"]) <= 4096 and data["input"].strip()
    speed = data.get("speed", 1.0)
    assert not isinstance(speed, bool) and isinstance(speed, (int, float)) and 0.25 <= speed <= 4.0
    assert data.get("response_format", "mp3") in RESPONSE_FORMATS and data.get("stream_format", "audio") in ("audio", "sse")
    if speech.model not in MODELS:
        return 404, "model_not_found"
    if speech.voice not in VOICES:
        return 404, "voice_not_found"
    return 200, None


def assert_openai_error(status: int, content_type: str, body: bytes) -> str | None:
    assert 400 <= status < 500, (status, body[:300])
    assert content_type.startswith("application/json"), (status, content_type, body[:300])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error["code"]


def assert_audio(content_type: str, first: bytes) -> None:
    assert content_type in (*CONTENT_TYPES.values(), "text/event-stream"), content_type
    assert first and (content_type != "text/event-stream" or first.startswith(b"data: ")), first[:100]


def post_and_check(client: httpx.Client, relay: InProcessRelay, body: bytes, headers: dict, expected: tuple[int, str | None]) -> None:
    """POST, then take the first audio and hang up (the relay must cancel the node's work) or
    read the error; the outcome must be the expected one."""
    with client.stream("POST", f"{relay.url}/v1/audio/speech", content=body, headers=headers) as response:
        status, content_type = response.status_code, response.headers.get("content-type", "")
        if status == 200:
            assert_audio(content_type, next(response.iter_raw()))
            code = None
        else:
            code = assert_openai_error(status, content_type, response.read())
    # node_busy: the node may not yet have stopped the streams earlier examples hung up on.
    assert (status, code) == expected or (expected[0] == 200 and code == "node_busy"), (status, code, expected, body[:300])


# --- request bodies -------------------------------------------------------------------------

speech_values = {
    "model": st.sampled_from(["tts-1", "tone", "tts-2", "", "m" * 129]) | json_values,
    "input": st.text(max_size=8) | st.sampled_from([" \n\t", "x" * 4096, "x" * 4097, "\U0001f642" * 30, "a\x00b"]) | json_values,
    "voice": st.sampled_from(["alloy", "tone", "nobody", ""])
    | json_values
    | st.fixed_dictionaries({"id": st.sampled_from(["alloy", "x"]) | json_values}),
    "instructions": st.none() | st.text(max_size=8) | st.just("i" * 4097) | json_values,
    "response_format": st.sampled_from((*RESPONSE_FORMATS, "ogg", "", "PCM")) | json_values,
    "speed": st.sampled_from([0.25, 4, 0.2499999, 4.0000001, math.nan, math.inf, -math.inf, 10**400, 1e308, True, "1"])
    | st.floats()
    | json_values,
    "stream_format": st.sampled_from(["audio", "sse", "mp3", ""]) | json_values,
}
raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 70).map(lambda n: json.dumps(GOOD).encode()[:n]),  # cut short
    st.sampled_from(
        [
            b"[" * 100_000,  # deeper than the JSON parser recurses
            b'{"model": "tts-1", "input": "Hi", "voice": "alloy", "speed": 1' + b"0" * 5000 + b"}",  # past int()'s digit limit
            b'{"model": "tts-1", "input": "Hi", "voice": "alloy", "speed": NaN}',
            b'{"model": "tts-1", "input": "Hi", "voice": "alloy", "speed": -Infinity}',
            b'{"model": "tts-1", "input": "Hi", "voice": "alloy", "speed": 1e999}',
            b'{"model": "tts-1", "input": "\xff\xfe", "voice": "alloy"}',  # not UTF-8
            b'{"model": "tts-1", "input": "\\ud800", "voice": "alloy"}',  # a lone surrogate
            b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),  # a byte-order mark
            json.dumps(GOOD).encode() + b" " * (MAX_BODY_BYTES - len(json.dumps(GOOD))),  # exactly the limit
            json.dumps(GOOD).encode() + b" " * (MAX_BODY_BYTES + 1 - len(json.dumps(GOOD))),  # one byte over
            json.dumps({**GOOD, "input": "x" * 70_000}).encode(),
            b'{"model": "tts-1", "model": "tts-1", "input": "Hi", "voice": "alloy"}',  # a repeated key
        ]
    ),
)


# One of each answer, whatever else Hypothesis draws.
EDGE_CASES = [
    {**GOOD, **change}
    for change in (
        {"model": "tts-2"},
        {"model": "tone"},
        {"model": "m" * 129},
        {"voice": "nobody"},
        {"voice": {"id": "tone"}},
        {"voice": {"id": "alloy", "x": 1}},
        {"voice": {}},
        {"input": "x" * 4097},
        {"input": " \n"},
        {"instructions": "i" * 4097},
        {"instructions": None},
        {"speed": 0.25},
        {"speed": 4},
        {"speed": 0.2499999},
        {"speed": 4.0000001},
        {"speed": 10**400},
        {"speed": math.nan},
        {"speed": math.inf},
        {"speed": True},
        {"response_format": "PCM"},
        {"response_format": None},
        {"stream_format": "sse"},
        {"stream_format": "mp3"},
        {"model": None},
        {"input": "\U0001f642" * 4096},
    )
]


@st.composite
def speech_bodies(draw) -> bytes:
    """Mostly a valid body with a few fields changed, removed or added; sometimes raw bytes or
    one of the edge cases."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(raw_bodies)
    if kind == 1:
        return json.dumps(draw(st.sampled_from(EDGE_CASES))).encode()
    body: dict = dict(GOOD)
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "set", "remove", "add"]))
        if action == "set":
            key = draw(st.sampled_from(sorted(speech_values)))
            body[key] = draw(speech_values[key])
        elif action == "remove" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        elif action == "add":
            body[draw(st.text(max_size=10))] = draw(json_values)
    # Raw lone surrogates (ensure_ascii=False) become bytes that are not UTF-8; NaN and Infinity
    # become the non-standard literals Python's json reads back.
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@settings(FUZZ, max_examples=200)
@given(body=speech_bodies(), content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
def test_fuzzed_speech_bodies_get_the_predicted_answer(relay, body, content_type):
    with httpx.Client(timeout=30) as client:
        post_and_check(client, relay, body, {**AUTH, "Content-Type": content_type}, predicted(body))


# --- headers --------------------------------------------------------------------------------

# Bytes a header value may carry on the wire (h11 refuses control characters on both ends).
header_values = st.lists(st.sampled_from([*range(0x20, 0x7F), *range(0x80, 0x100)]), max_size=40).map(bytes).map(bytes.strip)
KEY = API_KEY.encode()
authorizations = st.one_of(
    st.none(),
    st.just(b"Bearer " + KEY),
    header_values,
    header_values.map(lambda v: b"Bearer " + v),
    st.sampled_from(
        [
            b"bearer " + KEY,
            b"BEARER " + KEY,
            b"Bearer   " + KEY,
            b"Bearer",
            b"Basic dXNlcjpwYXNz",
            KEY,
            b"Bearer " + KEY + b"x",
            b"Bearer " + KEY[:-1],
            b"Bearer " + KEY + b" more",
            b"Token " + KEY,
            b"Bearer \xff\xfe",
            b"Bearer " + KEY.upper(),
            b"Bearer " + b"k" * 8000,
        ]
    ),
)
odd_headers = st.dictionaries(
    st.sampled_from(
        [
            "content-type",
            "x-forwarded-for",
            "x-forwarded-proto",
            "forwarded",
            "accept",
            "accept-encoding",
            "content-encoding",
            "cookie",
            "x-request-id",
            "origin",
            "range",
            "connection",
            "upgrade",
        ]
    ),
    header_values | st.sampled_from([b"application/json; charset=utf-16", b"gzip", b"upgrade", b"websocket", b"1.2.3.4, ::1"]),
    max_size=4,
)


@settings(FUZZ, max_examples=150)
@given(authorization=authorizations, headers=odd_headers, body=st.just(json.dumps(GOOD).encode()) | speech_bodies())
def test_fuzzed_headers_get_the_predicted_answer(relay, authorization, headers, body):
    token = bearer_token(authorization.decode("latin-1")) if authorization is not None else None
    if token is None:
        expected: tuple[int, str | None] = (401, "missing_api_key")
    elif token != API_KEY:
        expected = (401, "invalid_api_key")
    else:
        expected = predicted(body)
    if authorization is not None:
        headers = {**headers, "authorization": authorization.strip()}  # as it travels: h11 trims
    with httpx.Client(timeout=30) as client:
        post_and_check(client, relay, body, headers, expected)


# --- raw HTTP -------------------------------------------------------------------------------

REQUEST_LINES = [
    b"POST /v1/audio/speech HTTP/1.1",
    b"POST /v1/audio/speech HTTP/1.0",
    b"POST /v1/audio/speech?x=%zz&& HTTP/1.1",
]  # all reach the speech endpoint
ODD_LINES = [
    b"POST http://relay/v1/audio/speech HTTP/1.1",  # absolute form: uvicorn routes it by its whole URL (404)
    b"GET /v1/audio/speech HTTP/1.1",
    b"PUT /v1/audio/speech HTTP/1.1",
    b"POST /v1/audio/speech/ HTTP/1.1",
    b"POST /v1//audio/speech HTTP/1.1",
    b"POST * HTTP/1.1",
    b"POST /v1/audio/speech HTTP/2.0",
    b"POST /v1/audio/speech",
    b"PRI * HTTP/2.0",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"POST /%00 HTTP/1.1",
]


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, rest = b"", body
    for size in sizes:
        if rest:
            out += b"%x\r\n%s\r\n" % (len(rest[:size]), rest[:size])
            rest = rest[size:]
    if rest:
        out += b"%x\r\n%s\r\n" % (len(rest), rest)
    return out + b"0\r\n\r\n"


def _request(line: bytes, headers: list[bytes], body: bytes) -> bytes:
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


_GOOD_BODY = json.dumps(GOOD).encode()
_HEADERS = [b"Host: relay", b"Authorization: Bearer " + KEY]


# Bodies whose audio, if valid, is short: a raw exchange reads the whole response.
short_bodies = speech_bodies().filter(lambda b: predicted(b)[0] != 200 or len(parse_speech_request(b).input) <= 8)


@st.composite
def raw_exchanges(draw) -> tuple[bytes, tuple[int, str | None] | None]:
    """Bytes to send on one connection, and what the first response must be when the first
    request is well-formed (None when it is not: then any 4xx, or none at all)."""
    body = draw(st.just(_GOOD_BODY) | short_bodies)
    if draw(st.booleans()):  # a well-formed request, maybe with garbage behind it
        line, host, authorized = draw(st.sampled_from(REQUEST_LINES)), True, True
        framing = draw(st.sampled_from(["length", "chunked"] if line.endswith(b"1.1") else ["length"]))
    else:
        line = draw(st.sampled_from(REQUEST_LINES) | st.sampled_from(ODD_LINES) | st.binary(max_size=30))
        framing = draw(st.sampled_from(["length", "chunked", "longer", "shorter", "bogus", "twice", "bad-chunks", "both", "none"]))
        host, authorized = draw(st.integers(0, 9)) > 0, draw(st.integers(0, 9)) > 0
    headers = [b"Host: relay"] if host else []
    if authorized:
        headers.append(b"Authorization: Bearer " + KEY)
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "longer":  # the body never comes in full: the relay waits, then the client hangs up
        headers.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 100))))
    elif framing == "shorter":  # the rest of the body reads as the next request: garbage
        headers.append(b"Content-Length: %d" % max(0, len(body) - draw(st.integers(1, 100))))
    elif framing == "bogus":
        headers.append(b"Content-Length: " + draw(st.sampled_from([b"abc", b"-1", b"1e3", b"+5", b"0x10", b"9" * 30, b""])))
    elif framing == "twice":
        headers += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
    elif framing == "both":
        headers += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
    elif framing in ("chunked", "bad-chunks"):
        headers.append(b"Transfer-Encoding: chunked")
        body = chunked(body, draw(st.lists(st.integers(1, 40), max_size=4)))
        if framing == "bad-chunks":
            body = draw(st.sampled_from([b"zz\r\n" + body, body[:-5], body.replace(b"\r\n", b"\n", 1), b"-1\r\n" + body]))
    # What follows on the same connection ends with the server closing it, so no wait is needed.
    pipelined = draw(
        st.sampled_from(
            [
                b"",
                b"",
                b"GARBAGE\r\n\r\n",
                b"\x00" * 8 + b"\r\n\r\n",
                _request(REQUEST_LINES[0], [*_HEADERS, b"Connection: close", b"Content-Length: %d" % len(_GOOD_BODY)], _GOOD_BODY),
            ]
        )
    )
    if draw(st.booleans()) or not pipelined:
        headers.append(b"Connection: close")
    data = _request(line, headers, body) + pipelined
    well_formed = (
        line in REQUEST_LINES
        and (host or line.endswith(b"1.0"))
        and (framing == "length" or framing == "chunked" and line.endswith(b"1.1"))
    )
    expected = predicted(_unchunked(body, framing)) if well_formed and authorized else None
    return data, expected


def _unchunked(body: bytes, framing: str) -> bytes:
    if framing != "chunked":
        return body
    out, rest = b"", body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return out
        out, rest = out + rest[:size], rest[size + 2 :]


def exchange(relay: InProcessRelay, data: bytes, first: float, idle: float) -> bytes:
    """Send ``data``; read until the relay closes the connection, or stays silent for ``first``
    seconds before its first byte or ``idle`` seconds after one (it may rightly wait for bytes
    that never come). A relay that keeps talking for 20 s is a hang."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # it refused the start already
            pass
        sock.settimeout(first)
        received, deadline = b"", time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return received
            if not chunk:
                return received
            received += chunk
            sock.settimeout(idle)
    raise AssertionError(f"the relay kept the connection busy for 20 s: {received[:300]!r}")


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes, bool]]:
    """HTTP/1.1 responses in ``data``: (status, headers, body, complete)."""
    responses = []
    while data:
        head, separator, data = data.partition(b"\r\n\r\n")
        assert separator, f"a response cut inside its head: {head[:300]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:])}
        if 100 <= status < 200:
            continue
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, data, complete = data[:size], data[size:], len(data) >= size
        elif headers.get(b"transfer-encoding") == b"chunked":
            body, complete = b"", False
            while data:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                if not size:
                    data, complete = data[2:], True
                    break
                body, data = body + data[:size], data[size + 2 :]
        else:
            body, data, complete = data, b"", True
        responses.append((status, headers, body, complete))
    return responses


# The cases that found bugs, run every time whatever Hypothesis draws.
@example(case=(_request(REQUEST_LINES[0], [*_HEADERS, b"Content-Length: 500"], _GOOD_BODY), None))  # body cut short
@example(
    case=(
        _request(
            b"POST /v1/audio/speech/ HTTP/1.1", [*_HEADERS, b"Content-Length: %d" % len(_GOOD_BODY), b"Connection: close"], _GOOD_BODY
        ),
        None,
    )
)  # trailing slash
@example(case=(_request(REQUEST_LINES[0], [b"Host: relay", b"Transfer-Encoding: chunked"], b"-1\r\nxx\r\n0\r\n\r\n"), None))
@example(
    case=(
        _request(REQUEST_LINES[0], [*_HEADERS, b"Content-Length: %d" % len(_GOOD_BODY)], _GOOD_BODY)
        + _request(REQUEST_LINES[0], [*_HEADERS, b"Content-Length: %d" % len(_GOOD_BODY), b"Connection: close"], _GOOD_BODY),
        (200, None),
    )
)  # two requests pipelined: two complete streams
@settings(FUZZ, max_examples=150)
@given(raw_exchanges())
def test_raw_http_with_lying_lengths_and_pipelined_garbage(relay, case):
    data, expected = case
    # Generous waits where an answer must come (a loaded machine is slow), short ones where the
    # relay may rightly wait for bytes that never come.
    responses = parse_responses(exchange(relay, data, first=10 if expected else 0.3, idle=1.0 if expected else 0.3))
    for status, headers, body, complete in responses:
        content_type = headers.get(b"content-type", b"").decode()
        if status == 200:
            assert_audio(content_type, body)
        elif content_type.startswith("text/plain"):  # uvicorn's own answer to what is not HTTP at all
            assert status == 400 and b"Invalid HTTP request" in body, (status, body[:200])
        elif complete:
            assert_openai_error(status, content_type, body)
    if expected is not None:
        assert responses, f"no answer to a well-formed request: {data[:300]!r}"
        status, headers, body, complete = responses[0]
        code = json.loads(body)["error"]["code"] if status != 200 else None
        assert (status, code) == expected or (expected[0] == 200 and code == "node_busy"), (status, body[:300], expected)
        if status == 200:
            speech = parse_speech_request(_unchunked_body(data))
            assert complete, "a stream cut short"
            if speech.response_format == "pcm" and speech.stream_format == "audio" and speech.speed == 1.0:
                assert len(body) == len(speech.input) * FRAME_BYTES  # one frame per character, every byte


def _unchunked_body(data: bytes) -> bytes:
    head, _, rest = data.partition(b"\r\n\r\n")
    if b"Transfer-Encoding: chunked" in head:
        return _unchunked(rest, "chunked")
    size = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return rest[:size]


# --- the tunnel -----------------------------------------------------------------------------


FUZZ_HELLO = Hello("fuzzer", (ModelInfo("fuzz-model", (), ("v",)),))


class BadText(bytes):
    """A text frame whose payload is not UTF-8."""


over_limit = st.sampled_from([MAX_FRAME_BYTES + 1, WS_MAX_SIZE, WS_MAX_SIZE + 1, 100_000])
tunnel_frames = st.one_of(
    garbage,
    messages.map(encode),
    messages.map(encode),
    hellos.map(encode),
    over_limit.map(lambda n: '{"type": "draining"' + " " * n + "}"),
    over_limit.map(lambda n: b"\x00\x00\x00\x01" + b"a" * n),
    st.sampled_from([b"\xff\xfe", b'{"type": "draining", "x": "\xc3"}']).map(BadText),
)


def expected_close(frames: list) -> tuple[int, int, str | None]:
    """Which frame ends the tunnel, with which close code and reason, by the relay's rules: the
    websocket layer refuses frames over its size limit (1009) and text that is not UTF-8 (1007);
    the protocol refuses the rest (1002, the ProtocolError's message as the reason)."""
    conn = Connection("relay")
    for index, frame in enumerate(frames):
        if isinstance(frame, BadText):
            return index, 1007, None
        if len(frame.encode() if isinstance(frame, str) else frame) > WS_MAX_SIZE:
            return index, 1009, None
        try:
            conn.receive(frame)
        except ProtocolError as exc:
            return index, 1002, str(exc).encode()[:120].decode(errors="ignore")
    raise AssertionError("the conversation ends with a frame no relay accepts")


@settings(FUZZ, max_examples=120)
@given(hello=st.booleans(), frames=st.lists(tunnel_frames, max_size=6))
def test_fuzzed_tunnel_frames_close_that_tunnel_with_the_protocol_error(relay, hello, frames):
    """Through the real handshake (harness: a fresh challenge and its proof), then frames in any
    order; "not json" at the end, so that every conversation breaks the protocol somewhere."""
    frames = [_on_the_wire(frame) for frame in ([encode(FUZZ_HELLO)] if hello else []) + frames + ["not json"]]
    last, code, reason = expected_close(frames)
    with ws_connect(
        relay.tunnel_url,
        additional_headers=relay.tunnel_headers(),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        max_size=None,
        open_timeout=10,
        close_timeout=5,
    ) as ws:
        try:
            for frame in frames[: last + 1]:
                ws.send(bytes(frame), text=True) if isinstance(frame, BadText) else ws.send(frame)
        except ConnectionClosed:
            pass  # closed while we were still sending: the recv below says how
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None, "the relay dropped the connection without a close frame"
    assert closed.value.rcvd.code == code, (closed.value.rcvd, code, reason, frames[last][:200])
    if reason is not None:
        assert closed.value.rcvd.reason == reason


def _on_the_wire(frame: str | bytes) -> str | bytes:
    """A str with lone surrogates cannot be sent as text; its bytes go as a text frame that is not UTF-8."""
    try:
        if isinstance(frame, str):
            frame.encode()
        return frame
    except UnicodeEncodeError:
        return BadText(frame.encode("utf-8", "surrogatepass"))  # type: ignore[union-attr]
