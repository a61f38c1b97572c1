"""Property-based fuzzing of the tunnel protocol, without sockets.

Whatever a peer sends, ``decode`` and ``Connection.receive`` either accept it or raise
ProtocolError (the caller closes the tunnel with 1002): nothing else escapes, and a connection's
books stay straight. Two correct peers, whatever the interleaving of their messages on the wire,
never see a ProtocolError at all. Examples are derandomized, so CI runs the same ones every time.
"""

from __future__ import annotations

import json
import math

import pytest
from fuzz_strategies import (
    FUZZ,
    garbage,
    hellos,
    json_values,
    messages,
    near_valid_objects,
    requests,
    scalars,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tunnel.protocol import (
    ERROR_CODES,
    MAX_AUDIO_PAYLOAD,
    MAX_CREDIT,
    MAX_FRAME_BYTES,
    MAX_INPUT_CHARS,
    MAX_SPEED,
    MAX_STREAM_ID,
    MIN_SPEED,
    RESPONSE_FORMATS,
    Audio,
    Cancel,
    Connection,
    Credit,
    Draining,
    End,
    Error,
    Hello,
    Message,
    ModelInfo,
    ProtocolError,
    Request,
    decode,
    encode,
)


def assert_valid(message: Message) -> None:
    """What decode promises about a message it returns, checked independently of its code."""
    if isinstance(message, Audio):
        assert 0 <= message.id <= MAX_STREAM_ID and 0 < len(message.data) <= MAX_AUDIO_PAYLOAD
        return
    frame = encode(message)
    assert len(frame.encode()) <= MAX_FRAME_BYTES  # type: ignore[union-attr]
    for value in message.__dict__.values():
        if isinstance(value, str):
            value.encode()  # no lone surrogates
    if hasattr(message, "id"):
        assert 0 <= message.id <= MAX_STREAM_ID  # type: ignore[union-attr]
    if isinstance(message, Request):
        assert MIN_SPEED <= message.speed <= MAX_SPEED and math.isfinite(message.speed)
        assert 1 <= message.window <= MAX_CREDIT and message.response_format in RESPONSE_FORMATS
        assert 0 < len(message.input) <= MAX_INPUT_CHARS
    if isinstance(message, Credit):
        assert 1 <= message.size <= MAX_CREDIT
    if isinstance(message, Error):
        assert message.code in ERROR_CODES


def decodes_or_refuses(frame) -> Message | None:
    """decode's whole contract: a valid message or ProtocolError, nothing else."""
    try:
        message = decode(frame)
    except ProtocolError:
        return None
    assert_valid(message)
    assert decode(encode(message)) == message  # what it accepts, it can say back unchanged
    if isinstance(frame, str):  # and it accepts only what a correct peer says: no extra, no missing fields
        said = json.loads(encode(message))  # type: ignore[arg-type]
        if isinstance(message, Request) and message.instructions is None:
            del said["instructions"]  # optional: absent or null
        assert said == {k: v for k, v in json.loads(frame).items() if not (k == "instructions" and v is None)}
    return message


@FUZZ
@given(messages)
def test_every_valid_message_round_trips(message):
    frame = encode(message)
    if isinstance(frame, str) and len(frame.encode()) > MAX_FRAME_BYTES:  # a valid Hello may be too big to send
        with pytest.raises(ProtocolError):
            decode(frame)
    else:
        assert decode(frame) == message


@FUZZ
@given(st.text() | st.tuples(st.text(max_size=20), st.characters(categories=["Cs"]), st.text(max_size=20)).map("".join))
def test_arbitrary_text_is_decoded_or_refused(frame):
    decodes_or_refuses(frame)


@FUZZ
@given(
    st.binary(max_size=128)
    | st.integers(0, 2).flatmap(
        lambda k: st.sampled_from([0, 3, 4, 5, MAX_FRAME_BYTES - 1, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1]).map(lambda n: bytes([k]) * n)
    )
)
def test_arbitrary_bytes_are_decoded_or_refused(frame):
    message = decodes_or_refuses(frame)
    assert (message is not None) == (4 < len(frame) <= MAX_FRAME_BYTES)
    if message is not None:
        assert encode(message) == frame


# --- near-valid JSON ------------------------------------------------------------------------


@FUZZ
@given(near_valid_objects(), st.booleans())
def test_near_valid_json_is_decoded_or_refused(body, ascii_only):
    # ensure_ascii=True writes lone surrogates as \ud800 escapes, False as raw characters; NaN and
    # Infinity come out as the non-standard literals Python's json reads back.
    decodes_or_refuses(json.dumps(body, ensure_ascii=ascii_only))


SAMPLES = [
    Request(7, "req_1", "m", "v", "Hello.", "calm", "wav", 1.5, window=100),
    Hello("home", (ModelInfo("m", ("tts-1",), ("v",), False),)),
    Credit(7, 10),
    Cancel(7),
    End(7, 1, 2),
    Error(7, "busy", "full"),
]
FIELDS = [(sample, key) for sample in SAMPLES for key in json.loads(encode(sample))]  # type: ignore[arg-type]
FIELDS += [(SAMPLES[1], f"models.0.{key}") for key in ("name", "aliases", "voices", "any_voice", "extra")]


@pytest.mark.parametrize("sample, key", FIELDS, ids=[f"{type(s).__name__}.{k}" for s, k in FIELDS])
@settings(FUZZ, max_examples=80)
@given(value=scalars | json_values)
def test_each_field_with_edge_values_is_decoded_or_refused(sample, key, value):
    """Field by field, so each field's own checks (type, range, length) meet every edge value."""
    body = json.loads(encode(sample))  # type: ignore[arg-type]
    target, _, name = key.rpartition(".")
    (body["models"][0] if target else body)[name] = value
    decodes_or_refuses(json.dumps(body, ensure_ascii=False))


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "cancel", "id": ' + "9" * 5000 + "}",  # beyond Python's int-from-text digit limit
        '{"type": "credit", "id": 1, "size": 1e999}',
        '{"type": "cancel", "id": NaN}',
        '{"type": "cancel", "id": 1, "id": 2, "x": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"type": "end", "id": 1, "input_tokens": -0, "output_tokens": 1.0}',
        '{"type": "cancel", "id": 1}\ud800',
    ],
)
def test_pathological_json_is_refused(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


# --- one connection, any input in any order ---------------------------------------------------


def check_books(conn: Connection) -> None:
    assert all(credit >= 0 for credit in conn.open_streams.values()), conn.open_streams
    assert not set(conn.open_streams) & conn.cancelled, (conn.open_streams, conn.cancelled)
    if conn.role == "node":
        assert not conn.cancelled  # only a relay cancels


def receive_checked(conn: Connection, frame) -> None:
    """``receive`` accepts or raises ProtocolError; what it accepts moves the books as it should."""
    before, cancelled = dict(conn.open_streams), set(conn.cancelled)
    try:
        message = conn.receive(frame)
    except ProtocolError:
        assert conn.open_streams == before and conn.cancelled == cancelled  # a refused frame changes nothing
        return
    finally:
        check_books(conn)
    if isinstance(message, Audio):
        assert 0 < len(message.data) <= before[message.id]
        assert conn.open_streams[message.id] == before[message.id] - len(message.data)
    elif isinstance(message, (End, Error)) and conn.role == "relay":
        assert message.id in before and message.id not in conn.open_streams
    elif isinstance(message, Request):
        assert message.id not in before and conn.open_streams[message.id] == message.window
    elif isinstance(message, Credit):
        assert conn.open_streams[message.id] == before[message.id] + message.size
    elif message is None:  # dropped quietly: only frames for streams this side no longer serves
        assert conn.open_streams == before


class OneSideUnderFire(RuleBasedStateMachine):
    """One Connection fed any frames in any order, well-formed or not, about streams that are open,
    cancelled, ended or never existed (audio before hello, end before request, credit on unknown
    streams, audio beyond credit...), mixed with what this side itself sends. It only ever raises
    ProtocolError, and its books stay straight."""

    role = "relay"

    def __init__(self) -> None:
        super().__init__()
        self.conn = Connection(self.role)  # type: ignore[arg-type]
        self.seen: set[int] = {0, 1, MAX_STREAM_ID}  # every id this side has used, open or not

    def some_stream(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.seen | set(self.conn.open_streams) | self.conn.cancelled)))

    @rule(frame=garbage)
    def receive_garbage(self, frame):
        receive_checked(self.conn, frame)

    @rule(message=messages)
    def receive_any_message(self, message):  # either direction, any id
        receive_checked(self.conn, encode(message))

    @rule(data=st.data())
    def receive_peer_message(self, data):
        stream = self.some_stream(data)
        credit = self.conn.credit(stream)
        if self.role == "relay":
            size = data.draw(st.sampled_from(sorted({1, max(1, credit), credit + 1, MAX_AUDIO_PAYLOAD})))
            message = data.draw(
                st.sampled_from([Audio(stream, b"a" * size), End(stream, 1, 1), Error(stream, "busy", ""), Draining()]) | hellos
            )
        else:
            message = data.draw(
                st.sampled_from([Cancel(stream), Credit(stream, 5), Draining()])
                | requests.map(lambda r: Request(**{**r.__dict__, "id": stream, "window": 300}))
            )
        receive_checked(self.conn, encode(message))

    @invariant()
    def books(self):
        check_books(self.conn)


class RelayUnderFire(OneSideUnderFire):
    @precondition(lambda self: not (self.conn.draining_sent or self.conn.peer_draining))
    @rule(window=st.integers(1, 200))
    def request(self, window):
        stream = self.conn.new_stream_id()
        self.seen.add(stream)
        self.conn.send(Request(stream, "r", "m", "v", "x", window=window))

    @precondition(lambda self: self.conn.open_streams)
    @rule(data=st.data(), size=st.integers(1, 200))
    def credit(self, data, size):
        self.conn.send(Credit(data.draw(st.sampled_from(sorted(self.conn.open_streams))), size))

    @rule(data=st.data())
    def cancel(self, data):
        stream = self.some_stream(data)
        was_open = stream in self.conn.open_streams
        self.conn.send(Cancel(stream))
        assert stream not in self.conn.open_streams and (stream in self.conn.cancelled) >= was_open

    @rule()
    def draining(self):
        self.conn.send(Draining())


class NodeUnderFire(OneSideUnderFire):
    role = "node"

    @precondition(lambda self: any(self.conn.open_streams.values()))
    @rule(data=st.data(), size=st.integers(1, 200))
    def audio(self, data, size):
        stream = data.draw(st.sampled_from(sorted(k for k, v in self.conn.open_streams.items() if v)))
        self.conn.send(Audio(stream, b"a" * min(size, self.conn.credit(stream))))

    @precondition(lambda self: self.conn.open_streams)
    @rule(data=st.data(), failed=st.booleans())
    def end(self, data, failed):
        stream = data.draw(st.sampled_from(sorted(self.conn.open_streams)))
        self.conn.send(Error(stream, "busy", "") if failed else End(stream, 1, 1))
        assert stream not in self.conn.open_streams

    @rule()
    def hello(self):
        self.conn.send(Hello("n", ()))

    @rule()
    def draining(self):
        self.conn.send(Draining())


RelayUnderFire.TestCase.settings = settings(FUZZ, max_examples=150, stateful_step_count=40)
NodeUnderFire.TestCase.settings = settings(FUZZ, max_examples=150, stateful_step_count=40)
test_a_relay_connection_survives_any_input = RelayUnderFire.TestCase
test_a_node_connection_survives_any_input = NodeUnderFire.TestCase


# --- two correct peers, messages crossing on the wire ----------------------------------------


def _pick(streams: dict[int, int], index: int) -> int:
    return sorted(streams)[index % len(streams)]


class TwoPeers(RuleBasedStateMachine):
    """A relay and a node Connection joined by two ordered queues (one per direction, as a
    websocket is), delivered in any interleaving: cancels cross ends, credits cross ends, audio
    crosses cancels, requests cross a draining notice. A correct peer never causes a ProtocolError,
    and each side's credit differs from the other's by exactly what is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.relay = Connection("relay")
        self.node = Connection("node")
        self.to_node: list = []
        self.to_relay: list = []
        self.issued: list[int] = []

    @initialize(first_id=st.sampled_from([1, MAX_STREAM_ID - 1]))
    def hello(self, first_id):
        self.relay.next_id = first_id  # sometimes wrap around the id space
        self.to_relay.append(self.node.send(Hello("home", (ModelInfo("m", ("tts-1",), ("v",)),))))

    # relay side
    @precondition(lambda self: self.relay.hello_done and not (self.relay.draining_sent or self.relay.peer_draining))
    @rule(window=st.integers(1, 3 * MAX_AUDIO_PAYLOAD))
    def request(self, window):
        stream = self.relay.new_stream_id()
        self.issued.append(stream)
        self.to_node.append(self.relay.send(Request(stream, f"req_{stream}", "m", "v", "hi", window=window)))

    @precondition(lambda self: self.relay.open_streams)
    @rule(index=st.integers(0, 10), size=st.integers(1, 100_000))
    def credit(self, index, size):
        self.to_node.append(self.relay.send(Credit(_pick(self.relay.open_streams, index), size)))  # type: ignore[arg-type]

    @precondition(lambda self: self.issued)
    @rule(index=st.integers(0, 10))
    def cancel(self, index):  # also of streams long ended: a stale cancel must be harmless
        self.to_node.append(self.relay.send(Cancel(self.issued[index % len(self.issued)])))

    @precondition(lambda self: not self.relay.draining_sent)
    @rule()
    def relay_drains(self):
        self.to_node.append(self.relay.send(Draining()))

    # node side
    @precondition(lambda self: any(self.node.open_streams.values()))
    @rule(index=st.integers(0, 10), size=st.integers(1, MAX_AUDIO_PAYLOAD))
    def audio(self, index, size):
        stream = _pick({k: v for k, v in self.node.open_streams.items() if v}, index)
        size = min(size, self.node.credit(stream))  # type: ignore[arg-type]
        self.to_relay.append(self.node.send(Audio(stream, b"\x01" * size)))  # type: ignore[arg-type]

    @precondition(lambda self: self.node.open_streams)
    @rule(index=st.integers(0, 10), failed=st.booleans())
    def end(self, index, failed):
        stream = _pick(self.node.open_streams, index)
        self.to_relay.append(self.node.send(Error(stream, "internal_error", "x") if failed else End(stream, 1, 2)))  # type: ignore[arg-type]

    @rule()
    def hello_again(self):
        self.to_relay.append(self.node.send(Hello("home", ())))

    @precondition(lambda self: not self.node.draining_sent)
    @rule()
    def node_drains(self):
        self.to_relay.append(self.node.send(Draining()))

    # the wire
    @precondition(lambda self: self.to_node)
    @rule()
    def deliver_to_node(self):
        self.node.receive(self.to_node.pop(0))

    @precondition(lambda self: self.to_relay)
    @rule()
    def deliver_to_relay(self):
        self.relay.receive(self.to_relay.pop(0))

    @invariant()
    def books_agree(self):
        check_books(self.relay)
        check_books(self.node)
        in_flight: dict[int, int] = {}
        for message in map(decode, self.to_node):
            if isinstance(message, Credit):
                in_flight[message.id] = in_flight.get(message.id, 0) + message.size
        for message in map(decode, self.to_relay):
            if isinstance(message, Audio):
                in_flight[message.id] = in_flight.get(message.id, 0) + len(message.data)
        for stream in set(self.relay.open_streams) & set(self.node.open_streams):
            assert self.relay.credit(stream) - self.node.credit(stream) == in_flight.get(stream, 0)
        if not self.to_node and not self.to_relay:  # quiet wire: both agree which streams are live
            assert set(self.relay.open_streams) | self.relay.cancelled == set(self.node.open_streams)


TwoPeers.TestCase.settings = settings(FUZZ, max_examples=200, stateful_step_count=60)
test_two_correct_peers_never_break_the_protocol = TwoPeers.TestCase
