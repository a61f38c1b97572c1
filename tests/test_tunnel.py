"""The tunnel's doors and failure paths, with real relay and node processes on loopback."""

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import websockets
from harness import API_KEY, NODE_TOKEN, Node, Relay, free_port, synthetic_models
from websockets.exceptions import ConnectionClosed, InvalidStatus

from local_node.engine.synthetic import synthetic_frames
from local_node.serving.tunnel_client import challenge_url
from tunnel.handshake import tunnel_authorization, tunnel_proof
from tunnel.protocol import SUBPROTOCOL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SPEECH = {"model": "tts-1", "voice": "alloy", "response_format": "pcm"}


def speak(relay, text="Hello", **extra):
    return httpx.post(f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": text, **extra}, headers=AUTH, timeout=60)


@pytest.fixture
def relay(tmp_path):
    with Relay(tmp_path) as relay:
        yield relay


def test_wrong_node_token_is_refused_and_the_node_stops_with_a_clear_message(tmp_path, relay):
    with Node(tmp_path, relay, synthetic_models(), token="not-the-right-token-at-all") as node:
        assert node.proc.wait(timeout=30) == 2  # no retry loop
        assert "refused this node's token (HTTP 401)" in node.log()
        assert "not-the-right-token" not in node.log() + relay.log()  # secrets stay out of logs
        assert "wrong token" in relay.log()


def test_secrets_stay_out_of_debug_logs(tmp_path):
    with (
        Relay(tmp_path, args=("--log-level", "debug")) as relay,
        Node(tmp_path, relay, synthetic_models(), env={"LOG_LEVEL": "DEBUG"}) as node,
    ):
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        assert speak(relay).status_code == 200
        logs = relay.log() + node.log()
        assert "Authorization" in logs  # the headers are logged, their values not
        assert "Tunnel-HMAC" not in logs  # the node's proof neither, though it reveals no token
        for secret in (NODE_TOKEN, API_KEY):
            assert secret not in logs


def test_the_node_token_never_travels(relay):
    """The handshake carries a proof bound to one challenge and this protocol version, not the token."""
    challenge = httpx.get(f"{relay.url}/v1/tunnel/challenge", timeout=5).json()["challenge"]
    header = tunnel_authorization(NODE_TOKEN, challenge)
    assert NODE_TOKEN not in header and header.startswith("Tunnel-HMAC ")
    assert tunnel_proof(NODE_TOKEN, challenge) != tunnel_proof(NODE_TOKEN, challenge + "x")


async def refusal(relay, headers, subprotocols=(SUBPROTOCOL,)):
    """The refused handshake's (status, error code)."""
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(
            relay.tunnel_url, additional_headers=headers, subprotocols=list(subprotocols) if subprotocols is not None else None
        ):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body)["error"]["code"]


async def test_handshake_refusals(relay):
    def challenge():
        return httpx.get(f"{relay.url}/v1/tunnel/challenge", timeout=5).json()["challenge"]

    good = relay.tunnel_headers
    for headers, subprotocols, expected in [
        ({}, [SUBPROTOCOL], (401, "missing_node_credential")),
        ({"Authorization": f"Bearer {NODE_TOKEN}"}, [SUBPROTOCOL], (401, "missing_node_credential")),  # v2's way
        ({"Authorization": "Tunnel-HMAC nonsense"}, [SUBPROTOCOL], (401, "missing_node_credential")),
        ({"Authorization": tunnel_authorization("wrong-token-wrong-token", challenge())}, [SUBPROTOCOL], (401, "invalid_node_token")),
        ({"Authorization": tunnel_authorization(NODE_TOKEN, "never-issued-by-this-relay")}, [SUBPROTOCOL], (401, "invalid_challenge")),
        # The version is checked before the credential: an old node learns it must upgrade.
        ({}, ["qwen3-tts-tunnel.v2"], (426, "unsupported_protocol")),
        ({"Authorization": f"Bearer {NODE_TOKEN}"}, ["qwen3-tts-tunnel.v2"], (426, "unsupported_protocol")),
        (good(), ["qwen3-tts-tunnel.v99"], (426, "unsupported_protocol")),
        (good(), ["qwen3-tts-tunnel.v1"], (426, "unsupported_protocol")),
        (good(), None, (426, "unsupported_protocol")),
    ]:
        assert await refusal(relay, headers, subprotocols) == expected, headers
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(relay.tunnel_url, subprotocols=["qwen3-tts-tunnel.v2"]):
            pass
    assert SUBPROTOCOL in info.value.response.body.decode()
    assert "wrong token" in relay.log()


async def test_a_replayed_handshake_is_refused(relay):
    """A header that let a node in once (or failed once) is worth nothing the second time."""
    headers = relay.tunnel_headers()
    async with websockets.connect(relay.tunnel_url, additional_headers=headers, subprotocols=[SUBPROTOCOL]):
        pass  # accepted
    assert await refusal(relay, headers) == (401, "invalid_challenge")
    # A challenge presented with a wrong proof is used up too: the right proof cannot follow.
    challenge = httpx.get(f"{relay.url}/v1/tunnel/challenge", timeout=5).json()["challenge"]
    assert await refusal(relay, {"Authorization": tunnel_authorization("not-the-token-at-all", challenge)}) == (401, "invalid_node_token")
    assert await refusal(relay, {"Authorization": tunnel_authorization(NODE_TOKEN, challenge)}) == (401, "invalid_challenge")


def test_challenges_are_fresh_and_uncached(relay):
    answers = [httpx.get(f"{relay.url}/v1/tunnel/challenge", timeout=5) for _ in range(3)]
    assert all(a.status_code == 200 and a.headers["cache-control"] == "no-store" for a in answers)
    assert all(a.json()["expires_in"] == 30 for a in answers)
    assert len({a.json()["challenge"] for a in answers}) == 3


async def test_a_node_whose_challenge_the_relay_forgot_fetches_another_and_tries_again(tmp_path):
    """E.g. the relay restarted between the node's two requests: not the token's fault, so the node
    does not stop. A hand-made relay refuses the first handshake that way, then lets the node in."""
    handshakes, connected = [], asyncio.Event()

    def door(connection, request):
        if request.path == "/v1/tunnel/challenge":
            return connection.respond(200, json.dumps({"challenge": f"challenge-{len(handshakes)}", "expires_in": 30}))
        handshakes.append(request.headers["Authorization"])
        if len(handshakes) == 1:
            body = {"error": {"message": "forgotten", "type": "tunnel_error", "param": None, "code": "invalid_challenge"}}
            return connection.respond(401, json.dumps(body))
        return None

    async def handler(ws):
        connected.set()
        await ws.wait_closed()

    port = free_port()
    async with websockets.serve(handler, "127.0.0.1", port, subprotocols=[SUBPROTOCOL], process_request=door):
        with Node(tmp_path, SimpleNamespace(tunnel_url=f"ws://127.0.0.1:{port}/v1/tunnel"), synthetic_models()) as node:
            await asyncio.wait_for(connected.wait(), 60)
            assert handshakes == [tunnel_authorization(NODE_TOKEN, "challenge-0"), tunnel_authorization(NODE_TOKEN, "challenge-1")]
            assert "did not know the challenge it handed out" in node.log()
            assert node.proc.poll() is None


def test_a_node_retries_while_it_gets_no_challenge(tmp_path):
    """Nothing listening: like any failed connection, the node backs off and tries again."""
    port = free_port()
    with Node(tmp_path, SimpleNamespace(tunnel_url=f"ws://127.0.0.1:{port}/v1/tunnel"), synthetic_models()) as node:
        node.wait_for_log(
            f"relay ws://127.0.0.1:{port}/v1/tunnel unreachable: no challenge from http://127.0.0.1:{port}/v1/tunnel/challenge", timeout=60
        )
        node.wait_for_log("reconnecting to", timeout=10)
        with Relay(tmp_path, port=port) as relay:
            relay.wait_for_models({"tts-1"}, node=node, timeout=60)


def test_challenge_url_sits_next_to_the_tunnel():
    assert challenge_url("wss://tts.example.com/v1/tunnel") == "https://tts.example.com/v1/tunnel/challenge"
    assert challenge_url("ws://127.0.0.1:8000/v1/tunnel/") == "http://127.0.0.1:8000/v1/tunnel/challenge"
    assert challenge_url("wss://example.com:8443/tts/v1/tunnel") == "https://example.com:8443/tts/v1/tunnel/challenge"


def test_a_revoked_node_token_is_refused_after_the_relay_restarts(tmp_path):
    """A token taken out of RELAY_NODE_TOKENS stops working when the relay restarts: the node,
    connected until then, is refused and stops with the same clear message as for a wrong token."""
    with (
        Relay(tmp_path, env={"RELAY_NODE_TOKENS": f"home:{NODE_TOKEN},spare:another-node-token-0123456789"}) as relay,
        Node(tmp_path, relay, synthetic_models()) as node,
    ):
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        relay.kill()
        with Relay(tmp_path, port=relay.port, env={"RELAY_NODE_TOKENS": "spare:another-node-token-0123456789"}) as relay:
            assert node.proc.wait(timeout=60) == 2  # backoff is capped at 30 s
            assert "refused this node's token (HTTP 401)" in node.log()
            assert "wrong token" in relay.log()


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
    with Node(tmp_path, relay, synthetic_models()) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        async with websockets.connect(relay.tunnel_url, additional_headers=relay.tunnel_headers(), subprotocols=[SUBPROTOCOL]) as ws:
            for frame in frames:
                await ws.send(frame)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd.code == 1002
        assert await asyncio.to_thread(lambda: speak(relay).status_code) == 200  # the real node still serves


def test_client_disconnect_cancels_the_node_work(tmp_path, relay):
    """max_queue 0: while the cancelled synthesis still ran, a new request would get 429."""
    with Node(tmp_path, relay, synthetic_models(max_queue=0)) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x" * 200}, headers=AUTH, timeout=30
        ) as response:  # 200 frames: 16 s at real-time pace
            next(response.iter_bytes())
        node.wait_for_log("cancelled by the relay", timeout=10)
        node.wait_for_log("done,", timeout=5)
        frames = int(node.log().split("done, ")[1].split(" frames")[0])
        assert frames < 60, frames  # stopped within a fraction of the input
        assert speak(relay).status_code == 200


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_node_killed_mid_stream_ends_the_response_with_an_error_then_recovers(tmp_path, relay, stream_format):
    with Node(tmp_path, relay, synthetic_models()) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        received = b""
        with httpx.stream(
            "POST",
            f"{relay.url}/v1/audio/speech",
            headers=AUTH,
            timeout=30,
            json={**SPEECH, "input": "x" * 200, "stream_format": stream_format},
        ) as response:
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

    with Node(tmp_path, relay, synthetic_models()) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        response = speak(relay, "Back again")
        assert response.status_code == 200 and len(response.content) == 10 * 1920 * 2


def test_node_reconnects_after_the_relay_restarts(tmp_path):
    with Relay(tmp_path) as relay, Node(tmp_path, relay, synthetic_models()) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        relay.kill()
        node.wait_for_log("reconnecting to", timeout=10)
        with Relay(tmp_path, port=relay.port) as relay:  # the same address: the node comes back to it
            relay.wait_for_models({"tts-1"}, node=node, timeout=60)  # backoff is capped at 30 s
            assert speak(relay).status_code == 200


class ScriptedNode:
    """A hand-driven node on a real websocket, to put the relay through failures a real node rarely shows."""

    def __init__(self, relay, model="tone", aliases=("tts-1",)):
        self.relay, self.model, self.aliases = relay, model, aliases

    async def __aenter__(self):
        from tunnel.protocol import Connection, Hello, ModelInfo

        self.conn = Connection("node")
        self.ws = await websockets.connect(
            self.relay.tunnel_url, subprotocols=[SUBPROTOCOL], additional_headers=self.relay.tunnel_headers()
        )
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
    from tunnel.protocol import Cancel, Request

    with Relay(tmp_path, env={"RELAY_FIRST_AUDIO_TIMEOUT": "1"}) as relay:
        async with ScriptedNode(relay) as node:
            response = asyncio.create_task(post_async(relay))
            request = await node.next_message()
            assert isinstance(request, Request) and request.input == "Hi" and request.response_format == "pcm"
            assert isinstance(await node.next_message(), Cancel)
            response = await response
            assert response.status_code == 504 and response.json()["error"]["code"] == "node_timeout"


async def test_node_error_before_audio_is_a_502(relay):
    from tunnel.protocol import Error

    async with ScriptedNode(relay) as node:
        response = asyncio.create_task(post_async(relay))
        request = await node.next_message()
        await node.ws.send(node.conn.send(Error(request.id, "internal_error", "out of memory")))
        response = await response
        assert response.status_code == 502
        assert response.json()["error"] == {"message": "out of memory", "type": "server_error", "param": None, "code": "node_error"}


async def test_a_node_that_drops_before_the_first_byte_is_replaced_by_another(tmp_path, relay):
    with Node(tmp_path, relay, synthetic_models()) as real:
        await asyncio.to_thread(relay.wait_for_models, {"tts-1"}, 60.0, real)
        # The scripted node is idle while the real one is busy with a long request: it gets picked next.
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{relay.url}/v1/audio/speech", headers=AUTH, json={**SPEECH, "input": "x" * 50}) as busy:
                busy_chunks = busy.aiter_bytes()
                await busy_chunks.__anext__()
                node = await ScriptedNode(relay).__aenter__()
                response = asyncio.create_task(post_async(relay, input="Retry me"))
                request = await node.next_message()
                assert request.input == "Retry me"
                await node.ws.close()  # gone before sending anything
                response = await response
                assert response.status_code == 200 and len(response.content) == len("Retry me") * 1920 * 2


async def test_fifty_concurrent_requests_across_two_nodes_all_complete_with_the_right_audio(tmp_path, relay):
    """The real openai SDK, 50 requests at once; each response decoded and checked against its own input."""
    import io

    import openai
    import soundfile

    with (
        Node(tmp_path, relay, synthetic_models(max_queue=30), name="one") as one,
        Node(tmp_path, relay, synthetic_models(max_queue=30), name="two") as two,
    ):
        nodes = [one, two]
        await asyncio.to_thread(relay.wait_for_ready, nodes=2, watch=(one, two))
        client = openai.AsyncOpenAI(base_url=f"{relay.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        # 1 to 4 frames each, of 20 pitches: a response delivered to the wrong client would show.
        texts = [chr(ord("a") + i % 20) * (1 + i % 4) for i in range(50)]
        responses = await asyncio.gather(
            *(client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="wav") for text in texts)
        )
        for text, response in zip(texts, responses):
            samples, rate = soundfile.read(io.BytesIO(response.content), dtype="float32")
            assert rate == 24000
            assert np.abs(samples - np.concatenate(list(synthetic_frames(text)))).max() < 1e-3  # its own tone
        served = [node.log().count("done,") for node in nodes]
        assert sum(served) == 50 and min(served) >= 10, served  # both nodes took a share


def test_every_node_log_line_about_a_request_carries_the_relays_request_id(tmp_path, relay):
    with Node(tmp_path, relay, synthetic_models()) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        served = speak(relay, "Tagged")
        refused = speak(relay, "Tagged", voice="nobody")
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x" * 100}, headers=AUTH, timeout=30
        ) as response:
            cancelled = response.headers["x-request-id"]
            next(response.iter_bytes())
        node.wait_for_log(f"{cancelled}: done", timeout=10)
        assert served.status_code == 200 and refused.status_code == 404
        ids = {served.headers["x-request-id"], cancelled}
        lines = [
            line for line in node.log().splitlines() if "stream " in line or "done," in line or "cancelled" in line or "answered" in line
        ]
        assert len(lines) == 5  # start and end of the two streams, and the cancel
        assert all(line.split(": ")[1].split(":")[0] in ids for line in lines), lines
        assert all(request_id in relay.log() for request_id in ids)


async def test_a_node_whose_socket_no_longer_drains_is_dropped():
    """The server's ping timeout cannot close a socket that still has frames queued for a frozen
    node (its graceful close waits for them to go), so the session gives up on the node itself
    once a send has waited send_timeout: its reader ends, and with it the node's stay in the
    router (the endpoint's cleanup)."""
    from relay.router import Router
    from relay.tunnel_server import NodeSession
    from tunnel.protocol import Connection, Hello, ModelInfo, Request

    hello = Connection("node").send(Hello("frozen", (ModelInfo("m", (), ("v",)),)))

    class Frozen:
        """Said hello, then stopped reading: nothing more arrives, and no send completes."""

        def __init__(self) -> None:
            self.incoming = [{"type": "websocket.receive", "text": hello}]

        async def receive(self) -> dict:
            if self.incoming:
                return self.incoming.pop()
            await asyncio.Event().wait()

        async def send_text(self, frame: str) -> None:
            await asyncio.Event().wait()

    router = Router()
    session = NodeSession(Frozen(), "frozen", send_timeout=0.3)
    reader = asyncio.create_task(session.run(router))
    while not router.nodes:
        await asyncio.sleep(0.01)
    request = Request(id=session.new_stream_id(), request_id="req_1", model="m", voice="v", input="Hi")
    await asyncio.wait_for(session.open_stream(request), 5)  # the send gives up after 0.3 s
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reader, 5)
    assert session.dropped
