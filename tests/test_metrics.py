"""Prometheus metrics: the relay's and the node's /metrics, their doors, and that the numbers move
by the right amounts when real requests go through a real relay and a synthetic node."""

import asyncio
import signal
import socket
import threading
import time

import httpx
import pytest
import websockets
from harness import API_KEY, Node, Relay, free_port, synthetic_models
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from websockets.exceptions import InvalidStatus

from local_node.config import ConfigError, MetricsConfig, ModelConfig, VoiceConfig, parse_config
from local_node.engine.synthetic import SyntheticEngine
from local_node.serving.metrics import NodeMetrics, metrics_app
from local_node.serving.worker import Busy, ModelWorker
from relay.config import ConfigError as RelayConfigError
from relay.config import RelayConfig
from relay.metrics import RelayMetrics, model_label
from tunnel.credentials import Credentials
from tunnel.protocol import SUBPROTOCOL, ModelInfo, Request

METRICS_TOKEN = "metrics-token-0123456789abcdef"
NODE_METRICS_TOKEN = "node-metrics-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SPEECH = {"model": "tts-1", "voice": "alloy", "response_format": "pcm"}


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape(url: str, token: str = METRICS_TOKEN) -> dict:
    response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert response.status_code == 200, response.text
    return parse(response.text)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never held")
        time.sleep(0.05)
    return result


# --- the relay, with real processes --------------------------------------------------------------


def test_relay_metrics_need_their_token_and_do_not_exist_without_one(tmp_path):
    with Relay(tmp_path) as relay:  # no RELAY_METRICS_TOKEN
        response = httpx.get(f"{relay.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5)
        assert response.status_code == 404
        assert response.json() == httpx.get(f"{relay.url}/no-such-path", timeout=5).json()  # nothing tells them apart
        assert response.json()["error"]["code"] == "not_found"

    with Relay(tmp_path, env={"RELAY_METRICS_TOKEN": METRICS_TOKEN}) as relay:
        for headers in ({}, {"Authorization": "Bearer wrong-metrics-token-0123456789"}, AUTH):
            response = httpx.get(f"{relay.url}/metrics", headers=headers, timeout=5)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_metrics_token"
        samples = scrape(f"{relay.url}/metrics")
        assert value(samples, "relay_auth_failures_total", door="metrics") == 3
        assert value(samples, "relay_nodes_connected") == 0
        assert value(samples, "relay_asyncio_tasks") >= 1
        assert value(samples, "process_resident_memory_bytes") > 0
        assert METRICS_TOKEN not in relay.log()


def test_relay_metrics_follow_requests_nodes_and_failures(tmp_path):
    with Relay(tmp_path, env={"RELAY_METRICS_TOKEN": METRICS_TOKEN}) as relay, Node(tmp_path, relay, synthetic_models()) as node:
        metrics_url = f"{relay.url}/metrics"
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        before = scrape(metrics_url)
        assert value(before, "relay_nodes_connected") == 1
        assert value(before, "relay_node_connections_total", node="home") == 1
        assert value(before, "relay_node_streams_in_flight", node="home") == 0

        sizes = []
        for text in ("Hello", "Hi there"):
            response = httpx.post(f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": text}, headers=AUTH, timeout=30)
            assert response.status_code == 200
            sizes.append(len(response.content))
        assert sizes == [5 * 1920 * 2, 8 * 1920 * 2]
        refusals = [
            httpx.post(f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x", "model": "nope"}, headers=AUTH),
            httpx.post(f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x", "voice": "nobody"}, headers=AUTH),
            httpx.post(f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": ""}, headers=AUTH),
            httpx.post(
                f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x"}, headers={"Authorization": "Bearer sk-wrong-0123456789abcdef"}
            ),
        ]
        assert [r.status_code for r in refusals] == [404, 404, 400, 401]
        with pytest.raises(InvalidStatus):  # a node with a wrong token
            asyncio.run(_dial(relay.tunnel_url, relay.tunnel_headers(token="wrong-node-token-0123456789")))

        after = scrape(metrics_url)
        assert value(after, "relay_requests_total", model="tone", status="200") == 2  # the alias resolved to its name
        assert value(after, "relay_requests_total", model="-", status="404") == 1  # a model no node announced
        assert value(after, "relay_requests_total", model="tone", status="404") == 1  # a voice it lacks
        assert value(after, "relay_requests_total", model="-", status="400") == 1
        assert value(after, "relay_requests_total", model="-", status="401") == 1
        assert value(after, "relay_bytes_sent_total") == sum(sizes)
        assert value(after, "relay_time_to_first_byte_seconds_count") == 2
        assert value(after, "relay_request_duration_seconds_count") == 2
        # 8 frames at real-time pace: 0.64 s at least, and no first byte waits for all of them.
        assert value(after, "relay_request_duration_seconds_sum") > 0.64 + 0.4
        assert value(after, "relay_time_to_first_byte_seconds_sum") < value(after, "relay_request_duration_seconds_sum")
        assert value(after, "relay_auth_failures_total", door="api") == 1
        assert value(after, "relay_auth_failures_total", door="tunnel") == 1

        # A long stream in flight, then its node dies under it.
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x" * 200}, headers=AUTH, timeout=30
        ) as response:
            chunks = response.iter_bytes()
            next(chunks)
            during = scrape(metrics_url)
            assert value(during, "relay_node_streams_in_flight", node="home") == 1
            node.kill()
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in chunks:
                    pass
        gone = wait_until(
            lambda: (s := scrape(metrics_url)) and value(s, "relay_nodes_connected") == 0 and s, what="nodes_connected back to 0"
        )
        assert not [key for key in gone if key[0] == "relay_node_streams_in_flight"]  # the series left with the node
        assert value(gone, "relay_stream_failures_total", model="tone", code="node_failed") == 1
        assert value(gone, "relay_requests_total", model="tone", status="200") == 3  # its status was already sent
        assert value(gone, "relay_node_connections_total", node="home") == 1  # a counter keeps its history

        with Node(tmp_path, relay, synthetic_models()) as again:  # back: a reconnection
            relay.wait_for_models({"tts-1"}, node=again, timeout=60)
            back = scrape(metrics_url)
            assert value(back, "relay_node_connections_total", node="home") == 2
            assert value(back, "relay_nodes_connected") == 1


async def _dial(url: str, headers: dict) -> None:
    async with websockets.connect(url, additional_headers=headers, subprotocols=[SUBPROTOCOL]):
        pass


# --- the node, with real processes ---------------------------------------------------------------


def test_node_metrics_count_the_frames_it_streamed_and_stop_with_the_node(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with (
        Relay(tmp_path) as relay,
        Node(
            tmp_path,
            relay,
            synthetic_models(max_queue=2),
            env={"NODE_METRICS_TOKEN": NODE_METRICS_TOKEN},
            metrics={"listen": f"127.0.0.1:{port}", "token_env": "NODE_METRICS_TOKEN"},
        ) as node,
    ):
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abcdef"}, AUTH):
            assert httpx.get(url, headers=headers, timeout=5).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
        samples = scrape(url, NODE_METRICS_TOKEN)
        assert value(samples, "node_relay_connected", relay=relay.tunnel_url) == 1
        assert value(samples, "node_reconnects_total", relay=relay.tunnel_url) == 0
        assert value(samples, "node_queue_capacity", model="tone") == 1 + 2
        assert value(samples, "node_frames_generated_total", model="tone") in (None, 0)

        frames = 0
        for text in ("Hello", "Hi there", "Hey"):
            response = httpx.post(
                f"{relay.url}/v1/audio/speech", headers=AUTH, timeout=30, json={**SPEECH, "input": text, "stream_format": "sse"}
            )
            done = [line for line in response.text.splitlines() if "speech.audio.done" in line]
            frames += int(done[0].split('"output_tokens":')[1].split(",")[0])
        assert frames == len("Hello") + len("Hi there") + len("Hey")
        with httpx.stream(
            "POST", f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "x" * 200}, headers=AUTH, timeout=30
        ) as response:
            next(response.iter_bytes())
            assert value(scrape(url, NODE_METRICS_TOKEN), "node_queue_depth", model="tone") == 1
        wait_until(
            lambda: value(scrape(url, NODE_METRICS_TOKEN), "node_requests_total", model="tone", outcome="cancelled") == 1,
            what="the cancelled request counted",
        )

        samples = scrape(url, NODE_METRICS_TOKEN)
        cancelled_frames = int(node.log().split("done, ")[-1].split(" frames")[0])
        assert value(samples, "node_frames_generated_total", model="tone") == frames + cancelled_frames
        assert value(samples, "node_frame_seconds_count", model="tone") == frames + cancelled_frames
        assert value(samples, "node_requests_total", model="tone", outcome="done") == 3
        assert value(samples, "node_queue_depth", model="tone") == 0

        relay.kill()  # the node sees its relay go, then come back
        wait_until(
            lambda: value(scrape(url, NODE_METRICS_TOKEN), "node_relay_connected", relay=relay.tunnel_url) == 0, what="relay_connected 0"
        )
        with Relay(tmp_path, port=relay.port) as relay:  # the same address: the node comes back to it
            relay.wait_for_models({"tts-1"}, node=node, timeout=60)
            samples = scrape(url, NODE_METRICS_TOKEN)
            assert value(samples, "node_relay_connected", relay=relay.tunnel_url) == 1
            assert value(samples, "node_reconnects_total", relay=relay.tunnel_url) == 1

            node.proc.send_signal(signal.SIGTERM)  # the listener must not take the node's signal
            assert node.proc.wait(timeout=30) == 0
            assert "stopped" in node.log()
            with pytest.raises(httpx.ConnectError):
                httpx.get(url, timeout=2)
            assert NODE_METRICS_TOKEN not in node.log()


def test_node_stops_at_once_when_its_metrics_port_is_taken(tmp_path):
    with Relay(tmp_path) as relay, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with Node(tmp_path, relay, synthetic_models(), metrics={"listen": f"127.0.0.1:{port}", "token": NODE_METRICS_TOKEN}) as node:
            assert node.proc.wait(timeout=30) == 2
            assert f"metrics.listen: cannot listen on 127.0.0.1:{port}" in node.log()


# --- pure parts --------------------------------------------------------------------------------


class FakeRouter:
    def __init__(self, *infos: ModelInfo) -> None:
        self.infos = infos

    def catalogue(self):
        return {info.name: info for info in self.infos}


def test_model_label_is_an_announced_name_or_a_dash():
    router = FakeRouter(ModelInfo("custom_voice", ("tts-1", "tts-1-hd")), ModelInfo("base"))
    assert model_label(router, "tts-1-hd") == "custom_voice"
    assert model_label(router, "base") == "base"
    assert model_label(router, "anything a client makes up") == "-"


class FakeSession:
    def __init__(self, name: str, outstanding: int) -> None:
        self.name, self.outstanding = name, outstanding


def test_node_gauges_are_read_from_live_sessions_and_leave_with_them():
    one, two = RelayMetrics(), RelayMetrics()  # several apps in one process: separate registries
    a, b, c = FakeSession("home", 2), FakeSession("home", 1), FakeSession("office", 0)
    for session in (a, b, c):
        one.node_connected(session)
    samples = parse(one.exposition(None)[0].decode())
    assert value(samples, "relay_nodes_connected") == 3
    assert value(samples, "relay_node_streams_in_flight", node="home") == 3  # two nodes share a token
    assert value(samples, "relay_node_streams_in_flight", node="office") == 0
    one.node_left(c)
    one.node_left(c)  # twice is harmless
    samples = parse(one.exposition(None)[0].decode())
    assert value(samples, "relay_node_streams_in_flight", node="office") is None
    assert value(samples, "relay_node_connections_total", node="office") == 1
    assert value(parse(two.exposition(None)[0].decode()), "relay_nodes_connected") == 0


def test_openmetrics_when_the_scraper_asks_for_it():
    body, content_type = RelayMetrics().exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_relay_metrics_door_in_process():
    config = RelayConfig(
        api_keys=Credentials({"a": "k" * 20}),
        node_tokens=Credentials({"n": "n" * 20}),
        metrics_token=Credentials({"metrics": METRICS_TOKEN}),
    )
    from relay.app import create_app

    client = TestClient(create_app(config))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer " + "k" * 20}).status_code == 401  # an API key is not it
    samples = parse(client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text)
    assert value(samples, "relay_auth_failures_total", door="api") == 1
    assert value(samples, "relay_auth_failures_total", door="metrics") == 1


def test_relay_metrics_token_setting():
    base = {"RELAY_API_KEYS": "k" * 20, "RELAY_NODE_TOKENS": "n" * 20}
    assert not RelayConfig.from_env(base).metrics_token
    assert RelayConfig.from_env({**base, "RELAY_METRICS_TOKEN": " a:b,c-0123456789abcdef "}).metrics_token.match("a:b,c-0123456789abcdef")
    with pytest.raises(RelayConfigError, match="RELAY_METRICS_TOKEN"):
        RelayConfig.from_env({**base, "RELAY_METRICS_TOKEN": "short"})


def test_node_metrics_app_wants_its_token():
    metrics = NodeMetrics()
    metrics.link("ws://relay/v1/tunnel")
    client = TestClient(metrics_app(metrics, NODE_METRICS_TOKEN))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer " + NODE_METRICS_TOKEN[:-1]}).status_code == 401
    response = client.get("/metrics", headers={"Authorization": f"Bearer {NODE_METRICS_TOKEN}"})
    assert value(parse(response.text), "node_relay_connected", relay="ws://relay/v1/tunnel") == 0


def test_links_count_reconnections_not_the_first_connection():
    metrics = NodeMetrics()
    link = metrics.link("ws://a")
    link.up()
    link.down()
    link.up()
    link.up()
    samples = parse(metrics.exposition(None)[0].decode())
    assert value(samples, "node_reconnects_total", relay="ws://a") == 2
    assert value(samples, "node_relay_connected", relay="ws://a") == 1


def test_a_step_that_produced_nothing_is_not_a_frame_time():
    metrics = NodeMetrics()
    model = metrics.model("m", lambda: 7, 9)
    model.step(0, 5.0)
    model.step(3, 0.05)
    samples = parse(metrics.exposition(None)[0].decode())
    assert value(samples, "node_frames_generated_total", model="m") == 3
    assert value(samples, "node_frame_seconds_count", model="m") == 1
    assert value(samples, "node_frame_seconds_bucket", model="m", le="0.06") == 1
    assert value(samples, "node_queue_depth", model="m") == 7  # read at scrape time
    assert value(samples, "node_queue_capacity", model="m") == 9


async def test_worker_outcomes_and_synthetic_frames():
    metrics = NodeMetrics()
    engine = SyntheticEngine(ModelConfig("tone", True, "", engine="synthetic", max_batch=1, voices=(VoiceConfig("alloy", speaker="x"),)))
    worker = ModelWorker(engine, max_queue=0, metrics=metrics)

    def request(text: str, voice: str = "alloy", id: int = 1) -> Request:
        return Request(id=id, request_id="req_test", model="tone", voice=voice, input=text, response_format="pcm")

    async def ignore(data: bytes) -> None:
        pass

    assert await worker.run(request("abc"), threading.Event(), ignore) == (1, 3)
    with pytest.raises(Exception, match="voice"):
        await worker.run(request("abc", voice="nobody"), threading.Event(), ignore)
    cancelled = threading.Event()
    long = asyncio.create_task(worker.run(request("x" * 100), cancelled, ignore))
    while value(parse(metrics.exposition(None)[0].decode()), "node_frames_generated_total", model="tone") < 5:
        await asyncio.sleep(0.02)
    with pytest.raises(Busy):  # max_queue 0: one at a time
        await worker.run(request("abc", id=2), threading.Event(), ignore)
    cancelled.set()
    _, streamed = await asyncio.wait_for(long, 10)
    samples = parse(metrics.exposition(None)[0].decode())
    counts = {o: value(samples, "node_requests_total", model="tone", outcome=o) for o in ("done", "invalid", "busy", "cancelled", "error")}
    assert counts == {"done": 1, "invalid": 1, "busy": 1, "cancelled": 1, "error": 0}
    assert value(samples, "node_frames_generated_total", model="tone") == 3 + streamed
    assert value(samples, "node_queue_depth", model="tone") == 0


# --- the node's metrics: section -------------------------------------------------------------------

ENV = {"QWEN3_TTS_NODE_TOKEN": "secret-token-1234567890", "NODE_METRICS_TOKEN": NODE_METRICS_TOKEN}


def node_config(**metrics):
    return {
        "relay": {"url": "ws://127.0.0.1:9/v1/tunnel", "token_env": "QWEN3_TTS_NODE_TOKEN"},
        "models": {"a": {"engine": "synthetic"}},
        **({"metrics": metrics} if metrics else {}),
    }


def test_node_metrics_section():
    assert parse_config(node_config(), environ=ENV).metrics is None  # absent: no listener
    config = parse_config(node_config(listen="127.0.0.1:9464", token_env="NODE_METRICS_TOKEN"), environ=ENV)
    assert config.metrics == MetricsConfig("127.0.0.1", 9464, NODE_METRICS_TOKEN)
    assert NODE_METRICS_TOKEN not in repr(config)
    config = parse_config(node_config(listen="[::1]:9464", token=NODE_METRICS_TOKEN), environ=ENV)
    assert (config.metrics.host, config.metrics.port) == ("::1", 9464)


@pytest.mark.parametrize(
    "metrics, named",
    [
        ({"listen": "127.0.0.1:9464"}, "metrics.token"),  # a listener needs a token
        ({"token": NODE_METRICS_TOKEN}, "metrics.listen"),
        ({"listen": "127.0.0.1:9464", "token": NODE_METRICS_TOKEN, "path": "/m"}, "metrics.path"),
        ({"listen": "9464", "token": NODE_METRICS_TOKEN}, "metrics.listen"),
        ({"listen": "127.0.0.1:0", "token": NODE_METRICS_TOKEN}, "metrics.listen"),
        ({"listen": "127.0.0.1:http", "token": NODE_METRICS_TOKEN}, "metrics.listen"),
        ({"listen": 9464, "token": NODE_METRICS_TOKEN}, "metrics.listen"),
        ({"listen": "127.0.0.1:9464", "token": "short"}, "metrics.token"),
        ({"listen": "127.0.0.1:9464", "token_env": "UNSET_VARIABLE"}, "UNSET_VARIABLE"),
        ({"listen": "127.0.0.1:9464", "token": NODE_METRICS_TOKEN, "token_env": "NODE_METRICS_TOKEN"}, "token_env"),
    ],
)
def test_node_metrics_section_refusals(metrics, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_config(node_config(**metrics), environ=ENV)


def test_node_metrics_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="metrics"):
        parse_config({**node_config(), "metrics": "127.0.0.1:9464"}, environ=ENV)


# --- the node's metrics with the real engine (a tiny random checkpoint) -----------------------------


def test_node_metrics_with_a_tiny_qwen_model(tmp_path):
    """The batcher's steps: frames counted equal the frames served, warm-up excluded; a step serves
    every utterance in the batch, so there are at most as many steps as frames."""
    from local_node.testing.tiny_model import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "custom_voice", "custom_voice")
    port = free_port()
    models = {
        "custom_voice": {
            "source": str(tmp_path / "custom_voice"),
            "aliases": ["tts-1"],
            "max_new_frames": 6,
            "max_batch": 2,
            "voices": {"alloy": {"speaker": "vivian"}},
        }
    }
    url = f"http://127.0.0.1:{port}/metrics"
    with (
        Relay(tmp_path) as relay,
        Node(tmp_path, relay, models, metrics={"listen": f"127.0.0.1:{port}", "token": NODE_METRICS_TOKEN}) as node,
    ):
        relay.wait_for_models({"tts-1"}, node=node, timeout=600)
        assert value(scrape(url, NODE_METRICS_TOKEN), "node_frames_generated_total", model="custom_voice") in (None, 0)

        async def speak_twice():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(
                    *(
                        client.post(f"{relay.url}/v1/audio/speech", headers=AUTH, json={**SPEECH, "input": text, "stream_format": "sse"})
                        for text in ("Hello there.", "Good morning.")
                    )
                )

        per_request = []
        for response in asyncio.run(speak_twice()):
            done = [line for line in response.text.splitlines() if "speech.audio.done" in line]
            per_request.append(int(done[0].split('"output_tokens":')[1].split(",")[0]))
        # Random weights rarely sample EOS, but may (after the 2 frames it is barred from).
        assert all(2 <= n <= 6 for n in per_request), per_request
        frames = sum(per_request)
        samples = scrape(url, NODE_METRICS_TOKEN)
        assert value(samples, "node_frames_generated_total", model="custom_voice") == frames
        steps = value(samples, "node_frame_seconds_count", model="custom_voice")
        assert max(per_request) <= steps <= frames, steps  # fewer when the two requests shared steps
        assert value(samples, "node_frame_seconds_sum", model="custom_voice") > 0
        assert value(samples, "node_requests_total", model="custom_voice", outcome="done") == 2
        assert value(samples, "node_queue_capacity", model="custom_voice") == 2 + 4
