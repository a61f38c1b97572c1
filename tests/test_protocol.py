"""The tunnel wire protocol, without sockets."""

import json

import pytest

from tunnel.protocol import (
    MAX_AUDIO_PAYLOAD,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_KEPT,
    MAX_NAME_CHARS,
    UPLOAD_WINDOW,
    Audio,
    Body,
    Cancel,
    Connection,
    Consent,
    ConsentList,
    Credit,
    Done,
    Draining,
    End,
    Error,
    Forget,
    Hello,
    KeptVoice,
    ModelInfo,
    ProtocolError,
    Rename,
    Request,
    Text,
    Upload,
    VoiceList,
    decode,
    encode,
)

HELLO = Hello("home", (ModelInfo("custom_voice", ("tts-1",), ("vivian", "alloy")), ModelInfo("base", clones=True)))
UPLOAD = Upload(5, "voice", "voice_abc", "Grandma", 1700000000, 100, language="en-US", consent="cons_1", ref_text="Hello.")
VOICES = VoiceList((KeptVoice("voice_abc", "Grandma", 1700000000, "en-US", "cons_1"), KeptVoice("voice_d", "D", 1)))
CONSENTS = ConsentList((Consent("cons_1", "Me", "en-US", 1700000000),))
REQUEST = Request(7, "req_1", "custom_voice", "alloy", "Hello there.", None, "wav", 1.5, window=100)


@pytest.mark.parametrize(
    "message",
    [
        HELLO,
        REQUEST,
        Request(1, "r", "m", "v", "x", "be calm", "pcm", 0.25),
        Cancel(3),
        End(3, 4, 25),
        Error(3, "busy", "full"),
        Audio(9, b"\x00\x01" * 10),
        Credit(3, 65536),
        Draining(),
        UPLOAD,
        Upload(6, "consent", "cons_1", "Me", 0, 1),
        Forget(7, "consent", "cons_1"),
        Rename(8, "cons_1", "Me again"),
        Done(5),
        Text(3, "more words", False),
        Text(3, "", True),
        Request(2, "r", "m", "v", "First", live=True),
        VOICES,
        CONSENTS,
        ConsentList(()),
    ],
)
def test_round_trip(message):
    assert decode(encode(message)) == message


def test_the_wire_names_every_field():
    """The JSON a peer sees, written out: an attribute renamed in the dataclasses must not change it."""
    assert json.loads(encode(HELLO)) == {
        "type": "hello",
        "node": "home",
        "models": [
            {"name": "custom_voice", "aliases": ["tts-1"], "voices": ["vivian", "alloy"], "any_voice": False, "clones": False},
            {"name": "base", "aliases": [], "voices": [], "any_voice": False, "clones": True},
        ],
    }
    assert json.loads(encode(REQUEST)) == {
        "type": "request",
        "id": 7,
        "request_id": "req_1",
        "model": "custom_voice",
        "voice": "alloy",
        "input": "Hello there.",
        "instructions": None,
        "response_format": "wav",
        "speed": 1.5,
        "window": 100,
        "live": False,
    }
    assert json.loads(encode(Text(7, " more", done=True))) == {"type": "text", "id": 7, "text": " more", "done": True}
    assert json.loads(encode(Credit(3, 10))) == {"type": "credit", "id": 3, "size": 10}
    assert json.loads(encode(Cancel(3))) == {"type": "cancel", "id": 3}
    assert json.loads(encode(Draining())) == {"type": "draining"}
    assert json.loads(encode(End(3, 4, 25))) == {"type": "end", "id": 3, "input_tokens": 4, "output_tokens": 25}
    assert json.loads(encode(Error(3, "busy", "full"))) == {"type": "error", "id": 3, "code": "busy", "message": "full"}
    assert encode(Audio(258, b"ab")) == b"\x00\x00\x01\x02ab"
    assert json.loads(encode(UPLOAD)) == {
        "type": "upload",
        "id": 5,
        "kind": "voice",
        "object_id": "voice_abc",
        "name": "Grandma",
        "created_at": 1700000000,
        "size": 100,
        "language": "en-US",
        "consent": "cons_1",
        "ref_text": "Hello.",
    }
    assert encode(Body(258, b"ab")) == b"\x00\x00\x01\x02ab"
    assert json.loads(encode(Forget(7, "voice", "voice_abc"))) == {"type": "forget", "id": 7, "kind": "voice", "object_id": "voice_abc"}
    assert json.loads(encode(Rename(8, "cons_1", "Me"))) == {"type": "rename", "id": 8, "object_id": "cons_1", "name": "Me"}
    assert json.loads(encode(Done(5))) == {"type": "done", "id": 5}
    assert json.loads(encode(VOICES))["voices"][0] == {
        "id": "voice_abc",
        "name": "Grandma",
        "created_at": 1700000000,
        "language": "en-US",
        "consent": "cons_1",
    }
    assert json.loads(encode(CONSENTS)) == {
        "type": "consents",
        "consents": [{"id": "cons_1", "name": "Me", "language": "en-US", "created_at": 1700000000}],
    }


def test_audio_frames_stay_under_64_kib():
    node = Connection("node")
    node.receive(encode(Request(1, "r", "m", "v", "x", window=10 * MAX_FRAME_BYTES)))
    assert len(node.send(Audio(1, b"x" * MAX_AUDIO_PAYLOAD))) == MAX_FRAME_BYTES
    with pytest.raises(ValueError):
        node.send(Audio(1, b"x" * (MAX_AUDIO_PAYLOAD + 1)))
    with pytest.raises(ValueError):
        node.send(Audio(1, b""))


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
        _text(
            type="request",
            id=1,
            request_id="r",
            model="m",
            voice="v",
            input="",
            instructions=None,
            response_format="wav",
            speed=1.0,
            window=1,
        ),
        _text(
            type="request", id=1, request_id="r", model="m", voice="v", input="hi", instructions=None, response_format="wav", speed=1.0
        ),  # no window: a version 1 relay
        _text(
            type="request",
            id=1,
            request_id="r",
            model="m",
            voice="v",
            input="hi",
            instructions=None,
            response_format="wav",
            speed=1.0,
            window=0,
        ),
        _text(type="credit", id=1),
        _text(type="credit", id=1, size=0),
        _text(type="credit", id=1, size=2**31 + 1),
        _text(type="credit", id=1, size=1.5),
        _text(type="draining", now=True),
        _text(type="request", id=1, request_id="r", model="m", voice="v", input="hi", instructions=None, response_format="ogg", speed=1.0),
        _text(type="request", id=1, request_id="r", model="m", voice="v", input="hi", instructions=None, response_format="wav", speed=9.0),
        _text(
            type="request",
            id=1,
            request_id="r",
            model="m",
            voice="v",
            input="x" * 5000,
            instructions=None,
            response_format="wav",
            speed=1.0,
        ),
        '{"type": "cancel", "id": 1' + " " * MAX_FRAME_BYTES + "}",
        b"",
        b"\x00\x00\x00\x01",
        b"\x00\x00\x00\x01" + b"x" * MAX_FRAME_BYTES,
        "[" * 100000,
        _text(
            type="request", id=1, request_id="r", model="m", voice="v", input="hi", instructions=None, response_format="wav", speed=10**400
        ),
        '{"type": "hello", "node": "\\ud800", "models": []}',  # a lone surrogate is not text
        _text(type="hello", node="n", models=[{"name": "m", "aliases": [], "voices": [], "any_voice": False}]),  # a version 3 node
        _text(
            type="upload", id=1, kind="speaker", object_id="x", name="n", created_at=0, size=1, language=None, consent=None, ref_text=None
        ),
        _text(type="upload", id=1, kind="voice", object_id="x", name="n", created_at=0, size=0, language=None, consent=None, ref_text=None),
        _text(
            type="upload", id=1, kind="voice", object_id="x", name="n", created_at=0, size=2**30, language=None, consent=None, ref_text=None
        ),
        _text(type="upload", id=1, kind="voice", object_id="x" * (MAX_ID_CHARS + 1), name="n", created_at=0, size=1),
        _text(type="forget", id=1, kind="voice"),
        _text(type="rename", id=1, object_id="c", name=""),
        _text(type="done"),
        _text(type="text", id=1, text="", done=False),
        _text(type="text", id=1, text="x"),
        _text(type="text", id=1, text="x" * 5000, done=False),
        _text(type="voices", voices=[{"id": "v", "name": "n", "created_at": "0", "language": None}]),
        _text(type="voices", voices=[{"id": "v", "name": "n" * (MAX_NAME_CHARS + 1), "created_at": 0, "language": None, "consent": None}]),
        _text(type="consents", consents=[{"id": "c", "name": "n", "language": "en", "created_at": 0}] * (MAX_KEPT + 1)),
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


def _open_relay_stream(window: int) -> Connection:
    relay = Connection("relay")
    relay.receive(encode(HELLO))
    relay.send(Request(1, "r", "custom_voice", "alloy", "hi", window=window))
    return relay


def test_relay_accepts_audio_up_to_the_credit_and_no_further():
    relay = _open_relay_stream(window=10)
    assert relay.receive(encode(Audio(1, b"x" * 6))) == Audio(1, b"x" * 6)
    assert relay.receive(encode(Audio(1, b"x" * 4))) == Audio(1, b"x" * 4)
    assert relay.credit(1) == 0
    with pytest.raises(ProtocolError):
        relay.receive(encode(Audio(1, b"x")))


def test_credit_granted_by_the_relay_lets_the_node_send_that_much_more():
    relay = _open_relay_stream(window=4)
    relay.receive(encode(Audio(1, b"abcd")))
    relay.send(Credit(1, 3))
    assert relay.credit(1) == 3
    relay.receive(encode(Audio(1, b"efg")))
    with pytest.raises(ProtocolError):
        relay.receive(encode(Audio(1, b"h")))


def test_credit_is_per_stream():
    relay = _open_relay_stream(window=4)
    relay.send(Request(2, "r2", "custom_voice", "alloy", "hi", window=4))
    relay.receive(encode(Audio(1, b"abcd")))  # stream 1 is out of credit...
    assert relay.receive(encode(Audio(2, b"abcd"))) == Audio(2, b"abcd")  # ...stream 2 is not
    relay.send(Credit(2, 1))
    with pytest.raises(ProtocolError):
        relay.receive(encode(Audio(1, b"e")))


def test_relay_grants_credit_only_to_open_streams():
    relay = _open_relay_stream(window=4)
    relay.receive(encode(End(1, 0, 0)))
    with pytest.raises(ValueError):
        relay.send(Credit(1, 4))


def test_cancelled_streams_are_not_held_to_their_credit():
    relay = _open_relay_stream(window=1)
    relay.send(Cancel(1))
    assert relay.receive(encode(Audio(1, b"already on the wire"))) is None


def test_node_sends_no_more_than_its_credit_and_gains_what_the_relay_grants():
    node = Connection("node")
    node.receive(encode(REQUEST))  # window 100
    assert node.credit(REQUEST.id) == 100
    node.send(Audio(REQUEST.id, b"x" * 100))
    with pytest.raises(ValueError):
        node.send(Audio(REQUEST.id, b"x"))
    assert node.receive(encode(Credit(REQUEST.id, 50))) == Credit(REQUEST.id, 50)
    assert node.credit(REQUEST.id) == 50
    with pytest.raises(ValueError):
        node.send(Audio(REQUEST.id, b"x" * 51))
    node.send(End(REQUEST.id, 1, 1))
    assert node.receive(encode(Credit(REQUEST.id, 50))) is None  # crossed the end on the wire
    assert node.credit(REQUEST.id) == 0
    with pytest.raises(ValueError):
        node.send(Audio(999, b"x"))  # no such stream


def test_a_draining_node_gets_no_new_requests_but_its_streams_finish():
    relay = _open_relay_stream(window=10)
    assert relay.receive(encode(Draining())) == Draining()
    assert relay.peer_draining
    with pytest.raises(ValueError):
        relay.send(Request(2, "r2", "custom_voice", "alloy", "hi"))
    assert relay.receive(encode(Audio(1, b"abc"))) == Audio(1, b"abc")
    assert relay.receive(encode(End(1, 1, 1))) == End(1, 1, 1)


def test_a_draining_relay_sends_no_new_requests():
    relay = _open_relay_stream(window=10)
    relay.send(Draining())
    with pytest.raises(ValueError):
        relay.send(Request(2, "r2", "custom_voice", "alloy", "hi"))
    relay.send(Credit(1, 5))  # open streams carry on


def test_node_refuses_requests_after_the_relay_said_it_is_draining():
    node = Connection("node")
    node.receive(encode(REQUEST))
    assert node.receive(encode(Draining())) == Draining()
    node.send(Audio(REQUEST.id, b"still fine"))
    with pytest.raises(ProtocolError):
        node.receive(encode(Request(8, "r", "m", "v", "x")))


def test_node_takes_requests_that_crossed_its_own_draining_notice():
    node = Connection("node")
    node.send(HELLO)
    node.send(Draining())
    assert node.receive(encode(REQUEST)) == REQUEST


# --- calls: uploads, forgets, renames ---------------------------------------------------------


def _relay_after_hello() -> Connection:
    relay = Connection("relay")
    relay.receive(encode(HELLO))
    return relay


def test_an_upload_flows_within_the_credit_the_node_grants_and_its_size():
    relay, node = _relay_after_hello(), Connection("node")
    upload = Upload(1, "voice", "voice_a", "A", 0, UPLOAD_WINDOW + 10)
    assert node.receive(relay.send(upload)) == upload
    assert relay.credit(1) == node.credit(1) == UPLOAD_WINDOW
    first = relay.send(Body(1, b"x" * MAX_AUDIO_PAYLOAD))
    assert isinstance(first, bytes) and node.receive(first) == Body(1, b"x" * MAX_AUDIO_PAYLOAD)
    rest = UPLOAD_WINDOW - MAX_AUDIO_PAYLOAD
    while rest:
        size = min(rest, MAX_AUDIO_PAYLOAD)
        node.receive(relay.send(Body(1, b"x" * size)))
        rest -= size
    with pytest.raises(ValueError):  # the window is used up
        relay.send(Body(1, b"x"))
    relay.receive(node.send(Credit(1, UPLOAD_WINDOW)))
    assert relay.credit(1) == 10  # credit beyond the upload's size does not count
    node.receive(relay.send(Body(1, b"x" * 10)))
    with pytest.raises(ValueError):
        relay.send(Body(1, b"x"))
    assert relay.receive(node.send(VOICES)) == VOICES  # the new list goes before the answer
    assert relay.receive(node.send(Done(1))) == Done(1)
    assert not relay.calls and not node.calls


def test_a_node_refuses_upload_bytes_beyond_its_credit_or_the_size():
    node = Connection("node")
    node.receive(encode(Upload(1, "consent", "cons_a", "A", 0, UPLOAD_WINDOW + 5)))
    with pytest.raises(ProtocolError):
        node.receive(encode(Audio(1, b"x" * (UPLOAD_WINDOW + 1))))  # more than the window at once
    small = Connection("node")
    small.receive(encode(Upload(1, "consent", "cons_a", "A", 0, 3)))
    with pytest.raises(ProtocolError):
        small.receive(encode(Audio(1, b"abcd")))
    with pytest.raises(ProtocolError):  # no upload on a forget
        forget = Connection("node")
        forget.receive(encode(Forget(2, "voice", "voice_a")))
        forget.receive(encode(Audio(2, b"x")))


def test_a_call_is_answered_once_and_only_calls_are_answered_with_done():
    relay = _relay_after_hello()
    relay.send(Forget(1, "voice", "voice_a"))
    assert relay.receive(encode(Error(1, "not_found", "none"))) == Error(1, "not_found", "none")
    with pytest.raises(ProtocolError):
        relay.receive(encode(Done(1)))
    relay.send(Request(2, "r", "custom_voice", "alloy", "hi"))
    with pytest.raises(ProtocolError):
        relay.receive(encode(Done(2)))
    with pytest.raises(ProtocolError):  # credit for no call
        _relay_after_hello().receive(encode(Credit(9, 1)))


def test_calls_and_streams_share_ids_and_neither_reuses_an_open_one():
    node = Connection("node")
    node.receive(encode(REQUEST))
    with pytest.raises(ProtocolError):
        node.receive(encode(Rename(REQUEST.id, "cons_a", "A")))
    node.receive(encode(Rename(REQUEST.id + 1, "cons_a", "A")))
    with pytest.raises(ProtocolError):
        node.receive(encode(Upload(REQUEST.id + 1, "voice", "voice_a", "A", 0, 1)))


def test_no_calls_once_either_side_is_draining():
    relay = _relay_after_hello()
    relay.receive(encode(Draining()))
    with pytest.raises(ValueError):
        relay.send(Forget(1, "voice", "voice_a"))
    node = Connection("node")
    node.receive(encode(Draining()))
    with pytest.raises(ProtocolError):
        node.receive(encode(Forget(1, "voice", "voice_a")))


def test_the_longest_lists_a_node_keeps_fit_one_frame():
    """MAX_KEPT voices (or consents) with the longest names and ids, in characters that take the
    most bytes on the wire, still make a frame the peer accepts."""
    name, long_id = "\u0001" * MAX_NAME_CHARS, "v" * MAX_ID_CHARS
    voices = VoiceList(tuple(KeptVoice(long_id, name, 2**62, "x" * 35, long_id) for _ in range(MAX_KEPT)))
    consents = ConsentList(tuple(Consent(long_id, name, "x" * 35, 2**62) for _ in range(MAX_KEPT)))
    for message in (voices, consents):
        frame = encode(message)
        assert len(frame.encode()) <= MAX_FRAME_BYTES
        assert decode(frame) == message


# --- live text --------------------------------------------------------------------------------


def test_live_text_flows_only_to_an_open_live_stream_until_done():
    relay, node = _relay_after_hello(), Connection("node")
    node.receive(relay.send(Request(1, "r", "custom_voice", "alloy", "Hello", live=True)))
    assert node.receive(relay.send(Text(1, " there"))) == Text(1, " there")
    assert node.receive(relay.send(Text(1, "", done=True))) == Text(1, "", done=True)
    with pytest.raises(ValueError):  # the text is done
        relay.send(Text(1, " more"))
    with pytest.raises(ProtocolError):
        node.receive(encode(Text(1, " more")))
    node.receive(relay.send(Request(2, "r2", "custom_voice", "alloy", "Whole.")))
    with pytest.raises(ValueError):  # not a live request
        relay.send(Text(2, " more"))
    with pytest.raises(ProtocolError):
        node.receive(encode(Text(2, " more")))


def test_live_text_is_bounded_and_may_cross_the_nodes_end():
    from tunnel.protocol import MAX_INPUT_CHARS, MAX_LIVE_CHARS

    relay, node = _relay_after_hello(), Connection("node")
    node.receive(relay.send(Request(1, "r", "custom_voice", "alloy", "x", live=True)))
    sent = 1
    while sent + MAX_INPUT_CHARS <= MAX_LIVE_CHARS:
        node.receive(relay.send(Text(1, "x" * MAX_INPUT_CHARS)))
        sent += MAX_INPUT_CHARS
    with pytest.raises(ValueError):
        relay.send(Text(1, "x" * (MAX_LIVE_CHARS - sent + 1)))
    with pytest.raises(ProtocolError):
        node.receive(encode(Text(1, "x" * (MAX_LIVE_CHARS - sent + 1))))
    node.send(End(1, 1, 1))
    assert node.receive(encode(Text(1, "late"))) is None  # crossed the node's end on the wire
