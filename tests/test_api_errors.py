"""Every bad request gets the right status and an OpenAI-shaped error, and the relay keeps serving.

A real relay and a node with the synthetic engine (no model needed to test the API's doors).
"""

import httpx
import openai
import pytest
from harness import API_KEY, Node, Relay, synthetic_models

GOOD = {"model": "tts-1", "input": "Hi", "voice": "alloy", "response_format": "pcm"}


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    with Relay(tmp) as relay, Node(tmp, relay, synthetic_models(max_queue=0)) as node:
        relay.wait_for_models({"tts-1", "tone"}, node=node, timeout=60)
        yield relay


def post(relay, body=None, *, content=None, key=API_KEY, headers=None):
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.post(f"{relay.url}/v1/audio/speech", json=body, content=content, headers=headers, timeout=30)


def assert_openai_error(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({**GOOD, "input": None}, 400, "input"),
        ({k: v for k, v in GOOD.items() if k != "input"}, 400, "input"),
        ({**GOOD, "input": ""}, 400, "input"),
        ({**GOOD, "input": "x" * 4097}, 400, "input"),
        ({**GOOD, "model": "no-such-model"}, 404, "model"),
        ({**GOOD, "voice": "no-such-voice"}, 404, "voice"),
        ({**GOOD, "response_format": "ogg"}, 400, "response_format"),
        ({**GOOD, "speed": 0.1}, 400, "speed"),
        ({**GOOD, "speed": 5}, 400, "speed"),
        ({**GOOD, "speed": "fast"}, 400, "speed"),
        ({**GOOD, "input": ["a"]}, 400, "input"),
        ({**GOOD, "voice": 7}, 400, "voice"),
        ({**GOOD, "stream_format": "mp3"}, 400, "stream_format"),
        ({**GOOD, "nonsense": 1}, 400, "nonsense"),
    ],
)
def test_bad_input(relay, body, status, param):
    if body.get("input") is None and "input" in body:
        del body["input"]
    assert_openai_error(post(relay, body), status, param=param)
    assert post(relay, GOOD).status_code == 200  # still serving


@pytest.mark.parametrize("content", [b"{not json", b"[]", b"", b"\xff" * 10])
def test_malformed_json(relay, content):
    assert_openai_error(post(relay, content=content, headers={"Content-Type": "application/json"}), 400, "invalid_json")


def test_oversized_body(relay):
    assert_openai_error(post(relay, content=b"x" * (200 * 1024)), 413)


@pytest.mark.parametrize("key, code", [(None, "missing_api_key"), ("sk-wrong-wrong-wrong-wrong", "invalid_api_key")])
def test_missing_or_wrong_api_key(relay, key, code):
    error = assert_openai_error(post(relay, GOOD, key=key), 401, code)
    assert error["type"] == "invalid_request_error"
    for path in ("/v1/models", "/v1/audio/voices"):
        response = httpx.get(relay.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        assert_openai_error(response, 401, code)


def test_a_revoked_api_key_is_refused_once_the_relay_restarts(tmp_path):
    """Keys are read at start: one taken out of RELAY_API_KEYS stops working at the restart.
    (Being bearer secrets, as OpenAI designed them, keys are sent as they are every time: replaying
    one is simply using it. What protects them is TLS, and revoking one that leaked.)"""
    old_key = "sk-old-0123456789abcdef"
    with Relay(tmp_path, env={"RELAY_API_KEYS": f"test:{API_KEY},old:{old_key}"}) as relay:
        assert httpx.get(f"{relay.url}/v1/models", headers={"Authorization": f"Bearer {old_key}"}).status_code == 200
    with Relay(tmp_path, port=relay.port) as relay:  # RELAY_API_KEYS=test:<API_KEY> only
        assert_openai_error(post(relay, GOOD, key=old_key), 401, "invalid_api_key")
        assert_openai_error(httpx.get(f"{relay.url}/v1/models", headers={"Authorization": f"Bearer {old_key}"}), 401, "invalid_api_key")
        assert httpx.get(f"{relay.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert old_key not in relay.log()


def test_sdk_raises_typed_errors(relay):
    client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.audio.speech.create(model="gpt-nothing", voice="alloy", input="Hi")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi", speed=9)
    bad_key = openai.OpenAI(base_url=f"{relay.url}/v1", api_key="sk-wrong-wrong-wrong-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.audio.speech.create(model="tts-1", voice="alloy", input="Hi")


def test_unknown_route_and_method_are_openai_shaped(relay):
    assert_openai_error(httpx.get(f"{relay.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{relay.url}/v1/audio/speech", headers={"Authorization": f"Bearer {API_KEY}"}), 405)


def test_busy_node_answers_429_with_retry_after(relay):
    """max_queue 0: one synthesis at a time and no waiting line, so a second concurrent one is refused."""
    with httpx.Client(timeout=30) as client:
        long = {**GOOD, "input": "x" * 40}  # about 3 s of synthetic audio at real-time pace
        with client.stream("POST", f"{relay.url}/v1/audio/speech", json=long, headers={"Authorization": f"Bearer {API_KEY}"}) as first:
            assert first.status_code == 200
            chunks = first.iter_bytes()
            next(chunks)
            second = post(relay, GOOD)
            assert_openai_error(second, 429, "node_busy")
            assert int(second.headers["Retry-After"]) >= 1
            assert sum(len(chunk) for chunk in chunks) > 0  # the first stream is unaffected
    assert post(relay, GOOD).status_code == 200


def test_models_voices_health_and_ready(relay):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    models = httpx.get(f"{relay.url}/v1/models", headers=auth).json()
    assert models["object"] == "list"
    assert {"tts-1", "tone"} <= {m["id"] for m in models["data"]}
    assert all(m["object"] == "model" and m["owned_by"] for m in models["data"])
    voices = httpx.get(f"{relay.url}/v1/audio/voices", headers=auth).json()
    assert [(v["id"], v["name"], v["type"], v["models"]) for v in voices["data"]] == [
        ("alloy", "alloy", "preset", ["tone", "tts-1"]),
        ("tone", "tone", "preset", ["tone", "tts-1"]),
    ]
    assert voices["voices"] == voices["data"]
    assert httpx.get(f"{relay.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{relay.url}/ready").json() == {"status": "ready", "nodes": 1}


def test_no_node_connected_is_503_with_retry_after(tmp_path):
    with Relay(tmp_path) as relay:
        response = post(relay, GOOD)
        assert_openai_error(response, 503, "no_node_available")
        assert response.headers["Retry-After"] == "1"
        assert httpx.get(f"{relay.url}/ready").status_code == 503
