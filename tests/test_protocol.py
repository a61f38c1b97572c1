"""The tunnel wire protocol, without sockets."""

import json

import pytest

from relay.protocol import (
    MAX_AUDIO_PAYLOAD,
    MAX_FRAME_BYTES,
    Audio,
    Cancel,
    Connection,
    End,
    Error,
    Hello,
    ModelInfo,
    ProtocolError,
    Request,
    audio_frames,
    decode,
    encode,
)

HELLO = Hello("home", (ModelInfo("custom_voice", ("tts-1",), ("vivian", "alloy")),))
REQUEST = Request(7, "req_1", "custom_voice", "alloy", "Hello there.", None, "wav", 1.5)


@pytest.mark.parametrize(
    "message",
    [HELLO, REQUEST, Request(1, "r", "m", "v", "x", "be calm", "pcm", 0.25), Cancel(3), End(3, 4, 25), Error(3, "busy", "full"),
     Audio(9, b"\x00\x01" * 10)],
)
def test_round_trip(message):
    assert decode(encode(message)) == message


def test_audio_frames_stay_under_64_kib_and_reassemble():
    data = bytes(range(256)) * 700  # 179200 bytes
    frames = audio_frames(5, data)
    assert all(len(f) <= MAX_FRAME_BYTES for f in frames)
    assert len(frames) == -(-len(data) // MAX_AUDIO_PAYLOAD)
    assert b"".join(decode(f).data for f in frames) == data
    assert {decode(f).id for f in frames} == {5}


def _text(**body):
    return json.dumps(body)


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        _text(type="nonsense", id=1),
        _text(id=1),
        _text(type="cancel"),
        _text(type="cancel", id="1"),
        _text(type="cancel", id=True),
        _text(type="cancel", id=-1),
        _text(type="cancel", id=2**32),
        _text(type="cancel", id=1, extra=1),
        _text(type="end", id=1, input_tokens=1),
        _text(type="error", id=1, code="made_up", message="x"),
        _text(type="hello", node="n", models="all"),
        _text(type="hello", node="n", models=[{"name": "m", "aliases": [], "voices": [3], "any_voice": False}]),
        _text(type="hello", node="n", models=[{"name": "m", "aliases": [], "voices": [], "any_voice": 0}]),
        _text(type="hello", node="", models=[]),
        _text(type="request", id=1, request_id="r", model="m", voice="v", input="", instructions=None,
              response_format="wav", speed=1.0),
        _text(type="request", id=1, request_id="r", model="m", voice="v", input="hi", instructions=None,
              response_format="ogg", speed=1.0),
        _text(type="request", id=1, request_id="r", model="m", voice="v", input="hi", instructions=None,
              response_format="wav", speed=9.0),
        _text(type="request", id=1, request_id="r", model="m", voice="v", input="x" * 5000, instructions=None,
              response_format="wav", speed=1.0),
        '{"type": "cancel", "id": 1' + " " * MAX_FRAME_BYTES + "}",
        b"",
        b"\x00\x00\x00\x01",
        b"\x00\x00\x00\x01" + b"x" * MAX_FRAME_BYTES,
        "[" * 100000,
        _text(type="request", id=1, request_id="r", model="m", voice="v", input="hi", instructions=None,
              response_format="wav", speed=10**400),
        '{"type": "hello", "node": "\\ud800", "models": []}',  # a lone surrogate is not text
    ],
)
def test_malformed_frames_are_refused(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


def test_relay_requires_hello_first():
    relay = Connection("relay")
    with pytest.raises(ProtocolError):
        relay.receive(encode(End(1, 0, 0)))


def test_relay_side_stream_lifecycle():
    relay = Connection("relay")
    relay.receive(encode(HELLO))
    stream_id = relay.new_stream_id()
    relay.send(Request(stream_id, "r", "custom_voice", "alloy", "hi"))
    assert relay.receive(encode(Audio(stream_id, b"abc"))) == Audio(stream_id, b"abc")
    assert relay.receive(encode(End(stream_id, 1, 2))) == End(stream_id, 1, 2)
    with pytest.raises(ProtocolError):  # nothing may follow the end
        relay.receive(encode(Audio(stream_id, b"late")))
    with pytest.raises(ProtocolError):  # never opened
        relay.receive(encode(Audio(999, b"x")))


def test_frames_after_a_cancel_are_dropped_quietly_until_the_node_acknowledges():
    relay = Connection("relay")
    relay.receive(encode(HELLO))
    relay.send(Request(1, "r", "custom_voice", "alloy", "hi"))
    relay.send(Cancel(1))
    assert relay.receive(encode(Audio(1, b"in flight"))) is None
    assert relay.receive(encode(End(1, 1, 1))) is None
    assert not relay.cancelled and not relay.open_streams
    with pytest.raises(ProtocolError):
        relay.receive(encode(Audio(1, b"too late")))


def test_each_side_sends_only_its_own_messages():
    with pytest.raises(ValueError):
        Connection("node").send(Request(1, "r", "m", "v", "x"))
    with pytest.raises(ValueError):
        Connection("relay").send(HELLO)
    with pytest.raises(ProtocolError):
        Connection("node").receive(encode(HELLO))
    with pytest.raises(ProtocolError):
        Connection("relay").receive(encode(Cancel(1)))


def test_node_side_refuses_a_reused_stream_id_and_ignores_stale_cancels():
    node = Connection("node")
    node.receive(encode(REQUEST))
    with pytest.raises(ProtocolError):
        node.receive(encode(REQUEST))
    node.send(End(REQUEST.id, 1, 1))
    assert node.receive(encode(Cancel(REQUEST.id))) is None
    node.receive(encode(REQUEST))  # an id may be reused once its stream ended


def test_stream_ids_wrap_around():
    relay = Connection("relay", next_id=2**32 - 1)
    assert relay.new_stream_id() == 2**32 - 1
    assert relay.new_stream_id() == 1
