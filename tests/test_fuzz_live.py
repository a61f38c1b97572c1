"""Property-based fuzzing of the live text websocket (/v1/audio/speech/stream).

The relay runs in this process (as in tests/test_fuzz_http.py) with a real node running the
synthetic engine. Hypothesis opens sessions and sends sequences of messages: valid ones in odd
orders, near-valid ones, wrong types, binary frames, oversized ones. Every event the relay sends
must be one the protocol names, errors in OpenAI's spirit (a message and a code), and a session
ends only with a close code the README lists; never a hang, a leaked task or file descriptor, or
an error in the relay's log, and it still serves afterwards.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fuzz_strategies import FUZZ, json_values
from harness import API_KEY, Node, synthetic_models
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_fuzz_http import InProcessRelay, leaves_no_trace
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

EVENTS = {"audio.start", "audio.done", "session.done", "error"}
CLOSE_CODES = {1000, 1008, 1009, 1011}


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-live")
    with InProcessRelay() as relay, Node(tmp, relay, synthetic_models(max_queue=8, max_batch=4)) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        yield relay


@pytest.fixture(autouse=True)
def left_as_found(relay):
    with leaves_no_trace(relay):
        yield
    assert httpx.get(f"{relay.url}/ready").json()["nodes"] == 1


configs = st.fixed_dictionaries(
    {"type": st.just("session.config")},
    optional={
        "model": st.sampled_from(["tts-1", "tone", "nope", ""]) | st.integers(),
        "voice": st.sampled_from(["alloy", "tone", "nobody"]) | json_values,
        "speaker": st.sampled_from(["alloy", "tone"]),
        "response_format": st.sampled_from(["pcm", "wav", "mp3", "ogg"]),
        "speed": st.sampled_from([0.25, 1, 4.0, 9, -1, "fast"]),
        "split_granularity": st.sampled_from(["none", "sentence", "clause", "continuous", "word"]),
        "streaming_mode": st.sampled_from(["token_level", "sentence", "other"]),
        "instructions": st.none() | st.text(max_size=10),
        "extra": json_values,
    },
)
texts = st.fixed_dictionaries(
    {"type": st.just("input.text"), "text": st.text(max_size=30) | st.sampled_from(["Hi. There", "x" * 5000])}
) | st.fixed_dictionaries({"type": st.just("input.text"), "text": json_values})
simple = st.sampled_from([{"type": "input.done"}, {"type": "session.close"}, {"type": "input.commit"}, {}, {"type": None}])
messages = st.one_of(
    configs.map(json.dumps),
    texts.map(json.dumps),
    simple.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.just("[" * 5000),
    st.just(json.dumps({"type": "input.text", "text": "y" * 40000})),
)


@settings(FUZZ, max_examples=120)
@given(script=st.lists(messages, max_size=8), configured=st.booleans(), finish=st.booleans())
def test_fuzzed_live_sessions_get_protocol_events_and_close_codes(relay, script, configured, finish):
    url = relay.url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    with connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"}, open_timeout=10, close_timeout=5) as ws:
        closed = None
        if configured:  # past the config, into the utterances
            script = [json.dumps({"type": "session.config", "model": "tts-1", "voice": "alloy", "response_format": "pcm"}), *script]
        try:
            for message in script:
                ws.send(message)
            if finish:
                ws.send(json.dumps({"type": "session.close"}))
            else:
                ws.close()
            while True:
                received = ws.recv(timeout=30)
                if isinstance(received, str):
                    body = json.loads(received)
                    assert body["type"] in EVENTS, body
                    if body["type"] == "error":
                        assert body["message"] and body["code"], body
        except ConnectionClosed as gone:
            closed = gone.rcvd.code if gone.rcvd else None
        event(f"closed with {closed}")
        assert closed is None or closed in CLOSE_CODES, closed
