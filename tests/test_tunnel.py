"""The tunnel's doors and failure paths, with real relay and node processes on loopback."""

import asyncio
import json
import time

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness import API_KEY, NODE_TOKEN, Node, Relay, synthetic_models
from relay.protocol import SUBPROTOCOL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SPEECH = {"model": "tts-1", "voice": "alloy", "response_format": "pcm"}


def speak(relay, text="Hello", **extra):
    return httpx.post(f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": text, **extra}, headers=AUTH, timeout=60)


@pytest.fixture
def relay(tmp_path):
    relay = Relay(tmp_path)
    yield relay
    relay.stop()


def test_wrong_node_token_is_refused_and_the_node_stops_with_a_clear_message(tmp_path, relay):
    node = Node(tmp_path, relay, synthetic_models(), token="not-the-right-token-at-all")
    try:
        assert node.proc.wait(timeout=30) == 2  # no retry loop
        assert "refused this node's token (HTTP 401)" in node.log()
        assert "not-the-right-token" not in node.log() + relay.log()  # secrets stay out of logs
        assert "wrong token" in relay.log()
    finally:
        node.stop()


async def test_handshake_refusals(relay):
    for headers, subprotocols, status in [
        ({}, [SUBPROTOCOL], 401),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, [SUBPROTOCOL], 401),
        ({"Authorization": f"Bearer {NODE_TOKEN}"}, ["qwen3-tts-tunnel.v99"], 426),
        ({"Authorization": f"Bearer {NODE_TOKEN}"}, None, 426),
    ]:
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(relay.tunnel_url, additional_headers=headers, subprotocols=subprotocols):
                pass
        assert info.value.response.status_code == status
        if status == 426:
            assert SUBPROTOCOL in info.value.response.body.decode()


@pytest.mark.parametrize(
    "frames",
    [
        ["not json"],
        [json.dumps({"type": "end", "id": 1, "input_tokens": 0, "output_tokens": 0})],  # before hello
        [json.dumps({"type": "hello", "node": "x", "models": []}), b"\x00\x00\x00\x05audio-for-no-stream"],
        [json.dumps({"type": "hello", "node": "x", "models": [{"name": 5}]})],
        [json.dumps({"type": "request", "id": 1})],  # a relay message, sent the wrong way
        [b"\x00"],
    ],
)
async def test_malformed_tunnel_frames_close_that_tunnel_only(tmp_path, relay, frames):
    node = Node(tmp_path, relay, synthetic_models())
    try:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        async with websockets.connect(relay.tunnel_url, additional_headers={"Authorization": f"Bearer {NODE_TOKEN}"},
                                      subprotocols=[SUBPROTOCOL]) as ws:
            for frame in frames:
                await ws.send(frame)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd.code == 1002
        assert await asyncio.to_thread(lambda: speak(relay).status_code) == 200  # the real node still serves
    finally:
        node.stop()


def test_client_disconnect_cancels_the_node_work(tmp_path, relay):
    """max_queue 0: while the cancelled synthesis still ran, a new request would get 429."""
    node = Node(tmp_path, relay, synthetic_models(max_queue=0))
    try:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        with httpx.stream("POST", f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x" * 200},
                          headers=AUTH, timeout=30) as response:  # 200 frames: 16 s at real-time pace
            next(response.iter_bytes())
        node.wait_for_log("cancelled by the relay", timeout=10)
        node.wait_for_log("done,", timeout=5)
        frames = int(node.log().split("done, ")[1].split(" frames")[0])
        assert frames < 60, frames  # stopped within a fraction of the input
        assert speak(relay).status_code == 200
    finally:
        node.stop()


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_node_killed_mid_stream_ends_the_response_with_an_error_then_recovers(tmp_path, relay, stream_format):
    node = Node(tmp_path, relay, synthetic_models())
    try:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        received = b""
        with httpx.stream("POST", f"{relay.url}/v1/audio/speech", headers=AUTH, timeout=30,
                          json={**SPEECH, "input": "x" * 200, "stream_format": stream_format}) as response:
            chunks = response.iter_bytes()
            received += next(chunks)
            node.kill()
            killed = time.monotonic()
            if stream_format == "audio":
                with pytest.raises(httpx.RemoteProtocolError):  # the body is cut off, not completed
                    for chunk in chunks:
                        received += chunk
            else:
                for chunk in chunks:
                    received += chunk
                events = [json.loads(line[6:]) for line in received.decode().splitlines() if line.startswith("data: ")]
                assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "node_failed"
                assert all(e["type"] == "speech.audio.delta" for e in events[:-1])
            assert time.monotonic() - killed < 5
        assert speak(relay).status_code == 503  # nobody to serve it now

        node = Node(tmp_path, relay, synthetic_models())
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        response = speak(relay, "Back again")
        assert response.status_code == 200 and len(response.content) == 10 * 1920 * 2
    finally:
        node.stop()


def test_node_reconnects_after_the_relay_restarts(tmp_path):
    relay = Relay(tmp_path)
    node = Node(tmp_path, relay, synthetic_models())
    try:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        relay.kill()
        node.wait_for_log("reconnecting in", timeout=10)
        relay = Relay(tmp_path, port=relay.port)
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)  # backoff is capped at 30 s
        assert speak(relay).status_code == 200
    finally:
        node.stop()
        relay.stop()
