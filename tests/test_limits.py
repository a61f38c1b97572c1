"""Per-key rate limits and concurrency caps, per-node stream caps: the pure limiters with a fake
clock, then through a real relay process with synthetic-engine nodes."""

import asyncio
import contextlib
import time

import httpx
import pytest
from harness import API_KEY, Node, Relay, synthetic_models
from test_tunnel import SPEECH, ScriptedNode, speak

from relay.config import ConfigError, RelayConfig
from relay.limits import ConcurrencyLimiter, RateLimiter, retry_after
from tunnel.protocol import Audio, End, Request

OTHER_KEY = "sk-other-0123456789abcdef"
TWO_KEYS = {"RELAY_API_KEYS": f"test:{API_KEY},other:{OTHER_KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the pure parts ---------------------------------------------------------------------------


def test_the_bucket_allows_a_burst_of_the_per_minute_figure_then_refills_continuously():
    clock = Clock()
    limiter = RateLimiter(60, clock=clock)
    assert [limiter.take("a") for _ in range(60)] == [0.0] * 60
    assert limiter.take("a") == pytest.approx(1.0)  # one a second
    clock.now += 0.25
    assert limiter.take("a") == pytest.approx(0.75)  # a refusal spends nothing
    clock.now += 0.75
    assert limiter.take("a") == 0.0
    assert limiter.take("b") == 0.0  # every client has its own bucket
    clock.now += 3600
    assert [limiter.take("a") for _ in range(60)] == [0.0] * 60  # never more than the burst
    assert limiter.take("a") > 0


def test_a_rate_of_zero_is_no_limit():
    limiter = RateLimiter(0, clock=Clock())
    assert all(limiter.take("a") == 0.0 for _ in range(10_000))
    assert len(limiter) == 0


def test_buckets_are_bounded():
    clock = Clock()
    limiter = RateLimiter(1, clock=clock, max_clients=100)
    for i in range(1000):
        limiter.take(f"addr:{i}")
    assert len(limiter) == 100
    assert limiter.take("addr:999") > 0  # recent ones are kept
    assert limiter.take("addr:0") == 0.0  # the least recently seen went, and comes back full


def test_retry_after_is_whole_seconds_rounded_up_at_least_one():
    assert [retry_after(w) for w in (0.001, 0.5, 1.0, 1.01, 59.2)] == [1, 1, 1, 2, 60]


def test_concurrency_is_counted_per_client_and_released():
    limiter = ConcurrencyLimiter(2)
    assert limiter.acquire("a") and limiter.acquire("a")
    assert not limiter.acquire("a")
    assert limiter.acquire("b")
    limiter.release("a")
    assert limiter.acquire("a")
    for _ in range(3):
        limiter.release("a")
    limiter.release("b")
    assert limiter.open("a") == 0 and limiter._open == {}  # nothing kept for idle clients
    unlimited = ConcurrencyLimiter(0)
    assert all(unlimited.acquire("a") for _ in range(1000))


def test_limit_settings():
    base = {"RELAY_API_KEYS": "k" * 16, "RELAY_NODE_TOKENS": "n" * 16}
    config = RelayConfig.from_env(base)
    assert (config.rate_limit, config.max_streams_per_key, config.max_streams_per_node) == (60, 8, 64)
    assert config.challenge_rate_limit == 60
    config = RelayConfig.from_env({**base, "RELAY_RATE_LIMIT": "0", "RELAY_MAX_STREAMS_PER_KEY": "2", "RELAY_MAX_STREAMS_PER_NODE": "0"})
    assert (config.rate_limit, config.max_streams_per_key, config.max_streams_per_node) == (0, 2, 0)
    for key, value in [
        ("RELAY_RATE_LIMIT", "-1"),
        ("RELAY_RATE_LIMIT", "1.5"),
        ("RELAY_MAX_STREAMS_PER_KEY", "many"),
        ("RELAY_MAX_STREAMS_PER_NODE", "-3"),
    ]:
        with pytest.raises(ConfigError, match=key):
            RelayConfig.from_env({**base, key: value})


# --- through a relay --------------------------------------------------------------------------


def post(relay, key=API_KEY, body=b"{}"):
    """A speech request the relay refuses after the limits (400: no fields), so it costs no synthesis."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{relay.url}/v1/audio/speech", content=body, headers=headers, timeout=10)


def exhaust(relay, key=API_KEY) -> httpx.Response:
    """Send requests until the rate limit answers; return that answer."""
    for _ in range(500):
        response = post(relay, key)
        if response.status_code == 429:
            return response
        assert response.status_code == 400, response.text
    raise AssertionError("never rate limited")


@pytest.mark.parametrize("require_key", [True, False])
def test_the_rate_limit_answers_429_with_retry_after_then_recovers(tmp_path, require_key):
    """120 a minute: a burst of 120, then one every half second. Without keys, per address."""
    env = {**TWO_KEYS, "RELAY_RATE_LIMIT": "120"}
    if not require_key:
        env["RELAY_REQUIRE_API_KEY"] = "false"
    key = API_KEY if require_key else None
    with Relay(tmp_path, env=env) as relay:
        refused = exhaust(relay, key)
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert ("API key" if require_key else "address") in error["message"]
        assert refused.headers["Retry-After"] == "1"  # 0.5 s, rounded up
        if require_key:
            assert post(relay, OTHER_KEY).status_code == 400  # another key has its own bucket
        time.sleep(1.0)
        assert post(relay, key).status_code == 400  # a token came back
        models = httpx.get(f"{relay.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
        assert models.status_code == 200  # only speech requests are counted


def test_the_sdk_sees_a_rate_limit_error(tmp_path):
    import openai

    with Relay(tmp_path, env={"RELAY_RATE_LIMIT": "1"}) as relay:
        assert post(relay).status_code == 400
        client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.audio.speech.create(model="tts-1", voice="alloy", input="Hi")
        assert info.value.body["code"] == "rate_limit_exceeded"
        assert 1 <= int(info.value.response.headers["Retry-After"]) <= 60


def long_stream(client: httpx.Client, relay: Relay, frames: int = 100):
    """A streaming request kept open (about 8 s of audio at real-time pace) until its context ends."""
    return client.stream(
        "POST", f"{relay.url}/v1/audio/speech", headers={"Authorization": f"Bearer {API_KEY}"}, json={**SPEECH, "input": "x" * frames}
    )


async def test_a_key_with_its_streams_all_open_gets_429_until_one_ends(tmp_path):
    """A scripted node holds the streams open as long as the test wants."""
    with Relay(tmp_path, env={**TWO_KEYS, "RELAY_MAX_STREAMS_PER_KEY": "2"}) as relay:
        async with ScriptedNode(relay) as node, httpx.AsyncClient(timeout=30) as client:

            async def request(key: str = API_KEY) -> httpx.Response:
                return await client.post(
                    f"{relay.url}/v1/audio/speech", json={**SPEECH, "input": "Hi"}, headers={"Authorization": f"Bearer {key}"}
                )

            async def next_request() -> Request:
                while not isinstance(message := await node.next_message(), Request):
                    pass  # credit for audio the client took
                return message

            async def answered(stream_id: int) -> None:
                await node.ws.send(node.conn.send(Audio(stream_id, b"\0\0")))
                await node.ws.send(node.conn.send(End(stream_id, 1, 1)))

            held = [asyncio.create_task(request()) for _ in range(2)]
            opened = [await next_request() for _ in range(2)]  # both reached the node: both open
            refused = await request()
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_concurrent_requests"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert int(refused.headers["Retry-After"]) >= 1

            other = asyncio.create_task(request(OTHER_KEY))  # another key is not held back
            await answered((await next_request()).id)
            assert (await other).status_code == 200

            await answered(opened[0].id)  # one ends: the key may open one more
            # Which of the two held requests reached the node first is up to the network.
            done, pending = await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)
            assert [task.result().status_code for task in done] == [200]
            again = asyncio.create_task(request())
            await answered((await next_request()).id)
            assert (await again).status_code == 200
            await answered(opened[1].id)
            assert (await pending.pop()).status_code == 200


def test_a_node_at_its_stream_cap_gets_no_more_and_another_takes_the_work(tmp_path):
    """RELAY_MAX_STREAMS_PER_NODE=1, nodes that would queue more themselves (max_queue 8)."""
    with (
        Relay(tmp_path, env={"RELAY_MAX_STREAMS_PER_NODE": "1"}) as relay,
        Node(tmp_path, relay, synthetic_models(max_queue=8), name="one") as one,
        contextlib.ExitStack() as later,
    ):
        relay.wait_for_models({"tts-1"}, node=one, timeout=60)
        with httpx.Client(timeout=30) as client:
            with long_stream(client, relay) as held:
                assert held.status_code == 200
                busy = speak(relay)
                assert busy.status_code == 429 and busy.json()["error"]["code"] == "node_busy"
                assert busy.headers["Retry-After"] == "1"

                two = later.enter_context(Node(tmp_path, relay, synthetic_models(max_queue=8), name="two"))
                relay.wait_for_ready(nodes=2, watch=(two,))
                assert speak(relay, "Second").status_code == 200
                assert "done," in two.log() and "done," not in one.log()  # the second node took it

                with long_stream(client, relay) as also_held:
                    assert also_held.status_code == 200
                    assert speak(relay).status_code == 429  # both at their cap
        deadline = time.monotonic() + 10
        while (response := speak(relay)).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert response.status_code == 200


def test_challenges_are_rate_limited_per_address(tmp_path):
    """Anyone may ask for a node handshake challenge, but not so often that a flood pushes the
    nodes' own challenges out of the relay's bounded store."""
    with Relay(tmp_path, env={"RELAY_CHALLENGE_RATE_LIMIT": "30"}) as relay:
        url = f"{relay.url}/v1/tunnel/challenge"
        assert {httpx.get(url, timeout=10).status_code for _ in range(30)} == {200}  # the burst
        refused = httpx.get(url, timeout=10)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        time.sleep(2.1)  # 30 a minute: one more every 2 s
        assert httpx.get(url, timeout=10).status_code == 200
