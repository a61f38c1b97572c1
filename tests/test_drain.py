"""Graceful shutdown on SIGTERM, for the relay and for a node: no new work, open streams finish."""

import asyncio
import contextlib
import json
import signal

import httpx
import pytest
import websockets
from harness import Node, Relay, synthetic_models
from test_tunnel import AUTH, SPEECH, speak
from websockets.exceptions import InvalidStatus

from tunnel.protocol import SUBPROTOCOL

FRAME_BYTES = 1920 * 2


def test_a_draining_relay_finishes_open_streams_refuses_new_work_then_exits(tmp_path):
    with Relay(tmp_path, env={"RELAY_DRAIN_GRACE": "30"}) as relay, Node(tmp_path, relay, synthetic_models()) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", headers=AUTH, timeout=30, json={**SPEECH, "input": "x" * 40}
        ) as open_stream:
            chunks = open_stream.iter_bytes()
            received = next(chunks)
            relay.proc.send_signal(signal.SIGTERM)
            relay.wait_for_ready(status="draining")

            refused = speak(relay)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "relay_draining"
            ready = httpx.get(f"{relay.url}/ready", timeout=5)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            with pytest.raises(InvalidStatus) as info:  # nodes are turned away too
                asyncio.run(connect_node(relay))
            assert info.value.response.status_code == 503
            node.wait_for_log("is draining: it sends no new requests")

            for chunk in chunks:
                received += chunk
        assert len(received) == 40 * FRAME_BYTES  # the open stream ran to its end
        assert relay.proc.wait(timeout=15) == 0
        node.wait_for_log("reconnecting to")


async def connect_node(relay: Relay) -> None:
    async with websockets.connect(relay.tunnel_url, subprotocols=[SUBPROTOCOL], additional_headers=relay.tunnel_headers()):
        pass


def test_a_draining_relay_cuts_streams_that_outlive_the_grace(tmp_path):
    with Relay(tmp_path, env={"RELAY_DRAIN_GRACE": "1"}) as relay, Node(tmp_path, relay, synthetic_models()) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", headers=AUTH, timeout=30, json={**SPEECH, "input": "x" * 300, "stream_format": "sse"}
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            relay.proc.send_signal(signal.SIGTERM)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "node_failed"
        assert relay.proc.wait(timeout=15) == 0
        assert "cutting 1 open streams" in relay.log()


def test_a_draining_node_gets_no_new_work_finishes_its_streams_then_leaves(tmp_path):
    with (
        Relay(tmp_path) as relay,
        Node(tmp_path, relay, synthetic_models(), name="leaving") as leaving,
        contextlib.ExitStack() as later,
    ):
        relay.wait_for_models({"tts-1"}, node=leaving, timeout=60)
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", headers=AUTH, timeout=30, json={**SPEECH, "input": "x" * 40}
        ) as open_stream:
            chunks = open_stream.iter_bytes()
            received = next(chunks)
            staying = later.enter_context(Node(tmp_path, relay, synthetic_models(), name="staying"))
            relay.wait_for_ready(nodes=2, watch=(staying,))

            leaving.proc.send_signal(signal.SIGTERM)
            relay.wait_for_ready(nodes=1)  # the draining node takes no new work
            assert speak(relay, "New work").status_code == 200
            assert "8 chars" in staying.log() and "8 chars" not in leaving.log()

            for chunk in chunks:
                received += chunk
        assert len(received) == 40 * FRAME_BYTES
        assert leaving.proc.wait(timeout=15) == 0
        assert "done, 40 frames" in leaving.log()


def test_a_second_signal_stops_a_draining_node_at_once(tmp_path):
    with Relay(tmp_path) as relay, Node(tmp_path, relay, synthetic_models(), drain_grace=60) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", headers=AUTH, timeout=30, json={**SPEECH, "input": "x" * 300}
        ) as open_stream:
            next(open_stream.iter_bytes())
            node.proc.send_signal(signal.SIGTERM)
            node.wait_for_log("draining: telling 1 relays")
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(timeout=15) == 0
            assert "leaving with streams still open" in node.log()
