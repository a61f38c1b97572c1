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


def test_secrets_stay_out_of_debug_logs(tmp_path):
    relay = Relay(tmp_path, args=("--log-level", "debug"))
    node = Node(tmp_path, relay, synthetic_models(), env={"LOG_LEVEL": "DEBUG"})
    try:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        assert speak(relay).status_code == 200
        assert "Authorization" in relay.log() + node.log()  # the headers are logged, their values not
        for secret in (NODE_TOKEN, API_KEY):
            assert secret not in relay.log() + node.log()
    finally:
        node.stop()
        relay.stop()


async def test_handshake_refusals(relay):
    for headers, subprotocols, status in [
        ({}, [SUBPROTOCOL], 401),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, [SUBPROTOCOL], 401),
        ({"Authorization": f"Bearer {NODE_TOKEN}"}, ["qwen3-tts-tunnel.v99"], 426),
        ({"Authorization": f"Bearer {NODE_TOKEN}"}, ["qwen3-tts-tunnel.v1"], 426),  # before flow control
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
        node.wait_for_log("reconnecting to", timeout=10)
        relay = Relay(tmp_path, port=relay.port)
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)  # backoff is capped at 30 s
        assert speak(relay).status_code == 200
    finally:
        node.stop()
        relay.stop()


class ScriptedNode:
    """A hand-driven node on a real websocket, to put the relay through failures a real node rarely shows."""

    def __init__(self, relay, model="tone", aliases=("tts-1",)):
        self.relay, self.model, self.aliases = relay, model, aliases

    async def __aenter__(self):
        from relay.protocol import Connection, Hello, ModelInfo

        self.conn = Connection("node")
        self.ws = await websockets.connect(self.relay.tunnel_url, subprotocols=[SUBPROTOCOL],
                                           additional_headers={"Authorization": f"Bearer {NODE_TOKEN}"})
        # The marker model shows in /v1/models once the relay has taken this node's hello.
        models = (ModelInfo(self.model, self.aliases, ("alloy",)), ModelInfo("scripted-marker"))
        await self.ws.send(self.conn.send(Hello("scripted", models)))
        await asyncio.to_thread(self.relay.wait_for_models, {"scripted-marker"}, 30.0)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def next_message(self):
        return self.conn.receive(await asyncio.wait_for(self.ws.recv(), 10))


async def post_async(relay, **extra):
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "Hi", **extra}, headers=AUTH)


async def test_silent_node_times_out_with_504_and_is_told_to_cancel(tmp_path):
    from relay.protocol import Cancel, Request

    relay = Relay(tmp_path, env={"RELAY_FIRST_AUDIO_TIMEOUT": "1"})
    try:
        async with ScriptedNode(relay) as node:
            response = asyncio.create_task(post_async(relay))
            request = await node.next_message()
            assert isinstance(request, Request) and request.input == "Hi" and request.response_format == "pcm"
            assert isinstance(await node.next_message(), Cancel)
            response = await response
            assert response.status_code == 504 and response.json()["error"]["code"] == "node_timeout"
    finally:
        relay.stop()


async def test_node_error_before_audio_is_a_502(relay):
    from relay.protocol import Error

    async with ScriptedNode(relay) as node:
        response = asyncio.create_task(post_async(relay))
        request = await node.next_message()
        await node.ws.send(node.conn.send(Error(request.id, "internal_error", "out of memory")))
        response = await response
        assert response.status_code == 502
        assert response.json()["error"] == {"message": "out of memory", "type": "server_error", "param": None, "code": "node_error"}


async def test_a_node_that_drops_before_the_first_byte_is_replaced_by_another(tmp_path, relay):
    real = Node(tmp_path, relay, synthetic_models())
    try:
        await asyncio.to_thread(relay.wait_for_models, {"tts-1"}, 60.0, real)
        # The scripted node is idle while the real one is busy with a long request: it gets picked next.
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{relay.url}/v1/audio/speech", headers=AUTH,
                                     json={**SPEECH, "input": "x" * 50}) as busy:
                busy_chunks = busy.aiter_bytes()
                await busy_chunks.__anext__()
                node = await ScriptedNode(relay).__aenter__()
                response = asyncio.create_task(post_async(relay, input="Retry me"))
                request = await node.next_message()
                assert request.input == "Retry me"
                await node.ws.close()  # gone before sending anything
                response = await response
                assert response.status_code == 200 and len(response.content) == len("Retry me") * 1920 * 2
    finally:
        real.stop()


async def test_fifty_concurrent_requests_across_two_nodes_all_complete_with_the_right_audio(tmp_path, relay):
    """The real openai SDK, 50 requests at once; each response decoded and checked against its own input."""
    import io

    import openai
    import soundfile

    nodes = [Node(tmp_path, relay, synthetic_models(max_queue=30), name=name) for name in ("one", "two")]
    try:
        for node in nodes:
            await asyncio.to_thread(node.wait_for_log, "connected to")
        while httpx.get(f"{relay.url}/ready").json()["nodes"] < 2:
            await asyncio.sleep(0.05)
        client = openai.AsyncOpenAI(base_url=f"{relay.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        texts = ["a" * (1 + i % 4) for i in range(50)]  # 1 to 4 frames each
        responses = await asyncio.gather(*(
            client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="wav") for text in texts
        ))
        for text, response in zip(texts, responses):
            samples, rate = soundfile.read(io.BytesIO(response.content), dtype="int16")
            assert rate == 24000 and len(samples) == len(text) * 1920
            assert abs(samples).max() > 0.25 * 32767  # the tone, not silence
        served = [node.log().count("done,") for node in nodes]
        assert sum(served) == 50 and min(served) >= 10, served  # both nodes took a share
    finally:
        for node in nodes:
            node.stop()


def test_every_node_log_line_about_a_request_carries_the_relays_request_id(tmp_path, relay):
    node = Node(tmp_path, relay, synthetic_models())
    try:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        served = speak(relay, "Tagged")
        refused = speak(relay, "Tagged", voice="nobody")
        with httpx.stream("POST", f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x" * 100},
                          headers=AUTH, timeout=30) as response:
            cancelled = response.headers["x-request-id"]
            next(response.iter_bytes())
        node.wait_for_log(f"{cancelled}: done", timeout=10)
        assert served.status_code == 200 and refused.status_code == 404
        ids = {served.headers["x-request-id"], cancelled}
        lines = [line for line in node.log().splitlines() if "stream " in line or "done," in line
                 or "cancelled" in line or "answered" in line]
        assert len(lines) == 5  # start and end of the two streams, and the cancel
        assert all(line.split(": ")[1].split(":")[0] in ids for line in lines), lines
        assert all(request_id in relay.log() for request_id in ids)
    finally:
        node.stop()
