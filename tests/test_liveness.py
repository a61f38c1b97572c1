"""Liveness: heartbeats both ways drop a silent peer, nodes reconnect with jittered backoff, and a
node keeps a connection to every relay it lists. Real processes; a frozen peer is a SIGSTOPped one
(its kernel still holds the TCP connection open: the half-open case)."""

import contextlib
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from harness import Node, Relay, synthetic_models
from test_tunnel import AUTH, SPEECH, speak

from local_node.config import ConfigError, NodeConfig, parse_config
from local_node.serving.tunnel_client import Backoff
from relay.config import ConfigError as RelayConfigError
from relay.config import RelayConfig

FAST_PINGS = {"RELAY_PING_INTERVAL": "0.5", "RELAY_PING_TIMEOUT": "1"}


def test_default_heartbeats_drop_a_silent_peer_within_30_seconds():
    """A peer that stops answering is dropped at most this long after its last pong."""
    relay = RelayConfig()
    assert relay.ping_interval + relay.ping_timeout <= 30
    node = NodeConfig(relay_urls=("ws://127.0.0.1:2",), token="t")
    assert node.ping_interval + node.ping_timeout <= 30


def test_backoff_grows_exponentially_with_full_jitter_up_to_a_cap():
    highest = Backoff(base=1, cap=30, uniform=lambda low, high: high)
    assert [highest.next_delay(0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    lowest = Backoff(uniform=lambda low, high: low)
    assert lowest.next_delay(0) == 0  # full jitter: anywhere from zero, so dropped nodes spread out


def test_backoff_resets_only_after_a_connection_stayed_up():
    backoff = Backoff(base=1, cap=30, stable_after=60, uniform=lambda low, high: high)
    assert [backoff.next_delay(0) for _ in range(3)] == [1, 2, 4]
    assert backoff.next_delay(5) == 8  # connected, then dropped at once: still backing off
    assert backoff.next_delay(61) == 1  # a connection that lived: start over


def test_many_nodes_dropped_together_do_not_come_back_together():
    """A relay restart drops every node at once; their first attempts spread over the first window."""
    delays = sorted(Backoff().next_delay(61) for _ in range(1000))
    assert delays[0] < 0.05 and delays[-1] > 0.95
    assert max(b - a for a, b in zip(delays, delays[1:])) < 0.05  # no clumps, no gaps


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_frozen_node_is_dropped_its_started_stream_ends_with_an_error_and_its_queued_request_moves(tmp_path):
    # stop() wakes the frozen node with SIGCONT, so that it takes its SIGTERM.
    with (
        Relay(tmp_path, env=FAST_PINGS) as relay,
        Node(tmp_path, relay, synthetic_models(), name="frozen") as frozen,
        contextlib.ExitStack() as later,
    ):
        relay.wait_for_models({"tts-1"}, node=frozen, timeout=60)
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", headers=AUTH, timeout=60, json={**SPEECH, "input": "x" * 300, "stream_format": "sse"}
        ) as started:
            events = started.iter_lines()
            assert next(events).startswith("data: ")  # audio is flowing from the node about to freeze
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(speak, relay, "Queued")  # waits in the same node's queue, no audio yet
                frozen.wait_for_log("voice alloy, 6 chars")
                spare = later.enter_context(Node(tmp_path, relay, synthetic_models(), name="spare"))
                relay.wait_for_ready(nodes=2, watch=(spare,))

                frozen.proc.send_signal(signal.SIGSTOP)
                stopped = time.monotonic()
                rest = [json.loads(line[6:]) for line in events if line.startswith("data: ")]
                assert rest[-1]["type"] == "error" and rest[-1]["error"]["code"] == "node_failed"
                assert time.monotonic() - stopped < 10  # pings every 0.5 s, 1 s to answer

                response = queued.result(timeout=30)
                assert response.status_code == 200  # moved to the spare node, unnoticed
                assert len(response.content) == len("Queued") * 1920 * 2
        assert "voice alloy, 6 chars" in spare.log()


def test_a_node_serves_every_relay_it_lists_and_drops_a_frozen_one(tmp_path):
    # Should a step fail while the first relay is frozen, its stop() wakes it to take its SIGTERM.
    with (
        Relay(tmp_path) as first,
        Relay(tmp_path) as second,
        Node(tmp_path, [first, second], synthetic_models(), relay_options={"ping_interval": 0.5, "ping_timeout": 1}) as node,
    ):
        first.wait_for_models({"tts-1"}, node=node, timeout=60)
        second.wait_for_models({"tts-1"}, node=node, timeout=60)
        assert speak(first).status_code == 200 and speak(second).status_code == 200

        first.proc.send_signal(signal.SIGSTOP)
        node.wait_for_log(f"relay {first.tunnel_url} did not answer a ping within 1 s; dropping it", timeout=10)
        node.wait_for_log(f"relay {first.tunnel_url} unreachable or dropped", timeout=5)
        assert speak(second).status_code == 200  # the other relay never noticed
        first.proc.send_signal(signal.SIGCONT)
        node.wait_for_log(f"reconnecting to {first.tunnel_url}")
        first.wait_for_models({"tts-1"}, node=node, timeout=60)
        assert speak(first).status_code == 200

        node.proc.send_signal(signal.SIGTERM)  # a draining node tells every relay
        first.wait_for_log("is draining: no new work for it")
        second.wait_for_log("is draining: no new work for it")
        assert node.proc.wait(timeout=15) == 0


def test_a_refused_relay_among_several_is_left_alone_and_the_others_served(tmp_path):
    with (
        Relay(tmp_path) as good,
        Relay(tmp_path, env={"RELAY_NODE_TOKENS": "home:a-different-token-entirely"}) as other,
        Node(tmp_path, [other, good], synthetic_models()) as node,
    ):
        good.wait_for_models({"tts-1"}, node=node, timeout=60)
        node.wait_for_log(f"the relay {other.tunnel_url} refused this node's token (HTTP 401)")
        time.sleep(1)
        assert node.log().count("refused this node's token") == 1  # not retried
        assert node.proc.poll() is None and speak(good).status_code == 200


def node_config(**relay):
    data = {"relay": {"url": "ws://127.0.0.1:9/v1/tunnel", "token": "t", **relay}, "models": {"a": {"engine": "synthetic"}}}
    return parse_config(data, environ={})


def test_node_config_lists_relays_and_sets_heartbeats():
    config = node_config(url=["wss://one.example/v1/tunnel", "wss://two.example/v1/tunnel"], ping_interval=5, ping_timeout=2.5)
    assert config.relay_urls == ("wss://one.example/v1/tunnel", "wss://two.example/v1/tunnel")
    assert (config.ping_interval, config.ping_timeout, config.drain_grace) == (5.0, 2.5, 120.0)
    assert node_config().relay_urls == ("ws://127.0.0.1:9/v1/tunnel",)


@pytest.mark.parametrize(
    "relay, named",
    [
        ({"url": []}, "relay.url"),
        ({"url": ["ws://127.0.0.1:1/v1/tunnel", "ws://127.0.0.1:1/v1/tunnel"]}, "relay.url"),
        ({"url": ["ws://127.0.0.1:1/v1/tunnel", "http://b"]}, "relay.url"),
        ({"url": ["ws://127.0.0.1:1/v1/tunnel", 5]}, "relay.url"),
        ({"ping_interval": 0}, "relay.ping_interval"),
        ({"ping_timeout": "soon"}, "relay.ping_timeout"),
    ],
)
def test_bad_relay_settings_are_named(relay, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        node_config(**relay)


def test_relay_reads_heartbeat_and_drain_settings_from_the_environment():
    env = {
        "RELAY_API_KEYS": "k" * 16,
        "RELAY_NODE_TOKENS": "n" * 16,
        "RELAY_PING_INTERVAL": "3",
        "RELAY_PING_TIMEOUT": "4",
        "RELAY_DRAIN_GRACE": "5",
    }
    config = RelayConfig.from_env(env)
    assert (config.ping_interval, config.ping_timeout, config.drain_grace) == (3, 4, 5)
    with pytest.raises(RelayConfigError, match="RELAY_PING_TIMEOUT"):
        RelayConfig.from_env({**env, "RELAY_PING_TIMEOUT": "0"})
