"""Property-based fuzzing of the upload doors: voices and consent recordings.

The relay runs in this process (as in tests/test_fuzz_http.py), a real node with a tiny Base
checkpoint keeps what is uploaded. Hypothesis sends multipart forms with odd fields, odd values,
odd files and broken framing, to every voice and consent route with odd ids. Every answer must be
OpenAI-shaped: the object for what was valid, a JSON error with a 4xx otherwise; never a 500, a
hang, a task or file descriptor leaked, or an error logged; the relay still lists and speaks
afterwards, and the node keeps nothing it did not acknowledge.
"""

from __future__ import annotations

import io
import json
import os
import wave
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from fuzz_strategies import FUZZ
from harness import API_KEY, Node
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz_http import InProcessRelay, leaves_no_trace

from local_node.testing.tiny_model import write_tiny_checkpoint

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def wav(seconds: float, level: float = 0.3, rate: int = 8000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((level * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


GOOD_AUDIO = wav(1.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-voices")
    write_tiny_checkpoint(tmp / "base", "base")
    models = {"base": {"source": str(tmp / "base"), "max_new_frames": 2}}
    with InProcessRelay() as relay, Node(tmp, relay, models, voices_dir=str(tmp / "kept")) as node:
        relay.wait_for_models({"base"}, node=node, timeout=300)
        files = {"recording": ("c.wav", GOOD_AUDIO, "audio/wav")}
        consent = httpx.post(f"{relay.url}/v1/audio/voice_consents", headers=AUTH, data={"name": "c", "language": "en"}, files=files)
        assert consent.status_code == 200, consent.text
        yield relay, node, tmp / "kept", consent.json()["id"]


def kept(folder) -> set[str]:
    return set(os.listdir(folder / "voices")) | set(os.listdir(folder / "consents"))


@pytest.fixture(autouse=True)
def left_as_found(stack):
    relay, node, folder, consent = stack
    before = kept(folder)
    with leaves_no_trace(relay):
        yield
    assert kept(folder) == before  # each example deleted what it created
    assert httpx.get(f"{relay.url}/v1/audio/voices", headers=AUTH).status_code == 200
    assert httpx.get(f"{relay.url}/ready").json()["nodes"] == 1 and node.proc.poll() is None


# --- forms ---------------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=20),
    st.just(""),
    st.sampled_from(["en-US", "English", "zh", "x" * 40, "n" * 129, "é" * 200, "cons_", "voice_", "audio_sample", "prompt"]),
    st.text(max_size=5).map(lambda s: s + "\udfff"),
)
audio = st.one_of(
    st.just(GOOD_AUDIO),
    st.sampled_from([b"", b"RIFF", wav(0.2), wav(1.5, level=0.0), b"\x00" * 70000]),
    st.binary(max_size=200),
)
field_names = st.sampled_from(
    ["name", "language", "consent", "type", "ref_text", "prompt", "model", "audio_sample", "recording"]
) | st.text(max_size=8)


@st.composite
def forms(draw, consent_id: str) -> list[tuple[str, str | bytes, str | None]]:
    """(field, value, filename or None) parts, mostly near a valid upload."""
    parts: list[tuple[str, str | bytes, str | None]] = []
    if draw(st.booleans()):
        parts += [("name", "fuzz", None), ("language", "en-US", None), ("consent", consent_id, None)]
        parts.append((draw(st.sampled_from(["audio_sample", "recording"])), draw(audio), "a.wav"))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(field_names)
        if draw(st.booleans()):
            parts.append((name, draw(audio), draw(st.sampled_from(["a.wav", "", 'x"; name="y', "é.mp3"]))))
        else:
            parts.append((name, draw(texts), None))
    return draw(st.permutations(parts)) if parts else parts


def encode_form(parts, boundary: str, mangle: str) -> bytes:
    out = io.BytesIO()
    for name, value, filename in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"Content-Disposition: {disposition}\r\n".encode("utf-8", "surrogatepass"))
        if filename is not None:
            out.write(b"Content-Type: audio/wav\r\n")
        out.write(b"\r\n")
        out.write(value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass"))
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    body = out.getvalue()
    if mangle == "truncate":
        return body[: len(body) // 2]
    if mangle == "no closing":
        return body[: -len(f"--{boundary}--\r\n")]
    if mangle == "garbage":
        return b"\xff\xfe garbage " + body
    return body


routes = st.sampled_from(
    [
        ("POST", "/v1/audio/voices"),
        ("POST", "/v1/audio/voice_consents"),
        ("POST", "/v1/audio/voice_consents/{id}"),
        ("GET", "/v1/audio/voices/{id}"),
        ("DELETE", "/v1/audio/voices/{id}"),
        ("GET", "/v1/audio/voice_consents/{id}"),
        ("DELETE", "/v1/audio/voice_consents/{id}"),
        ("GET", "/v1/audio/voice_consents"),
        ("PUT", "/v1/audio/voices"),
    ]
)
ids = st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(["voice_0", "cons_0", "..", "%2e%2e", "a" * 300, "voice_\u00e9"]))


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzzed_uploads_and_ids_get_an_openai_shaped_answer(stack, data):
    relay, _, _, consent = stack
    method, path = data.draw(routes)
    if "{id}" in path:
        path = path.replace("{id}", quote(data.draw(ids).encode("utf-8", "surrogatepass"), safe=""))
    if method == "GET" and path.endswith("voice_consents"):
        path += data.draw(st.sampled_from(["", "?limit=0", "?limit=101", "?limit=x", "?after=nope", "?limit=1"]))
    boundary = data.draw(st.sampled_from(["b0undary", "x" * 70, "ünïcode"]))
    content_type = data.draw(
        st.sampled_from(
            [f"multipart/form-data; boundary={boundary}", "multipart/form-data", "application/json", "multipart/form-data; boundary=other"]
        )
    )
    body = encode_form(data.draw(forms(consent)), boundary, data.draw(st.sampled_from(["", "", "truncate", "no closing", "garbage"])))
    if path.startswith("/v1/audio/voice_consents/") and method == "POST" and data.draw(st.booleans()):
        body, content_type = json.dumps({"name": data.draw(texts)}, ensure_ascii=False).encode("utf-8", "surrogatepass"), "application/json"
    headers = {**AUTH, "Content-Type": content_type.encode("utf-8")}  # raw bytes: a header may carry them
    with httpx.Client(timeout=60) as client:
        response = client.request(method, f"{relay.url}{path}", content=body, headers=headers)
        assert response.headers["content-type"].startswith("application/json"), (response.status_code, response.text[:300])
        answer = response.json()
        if response.status_code == 200:
            kind = answer.get("object")
            assert kind in ("audio.voice", "audio.voice_consent", "audio.voice.deleted", "list"), answer
            if method == "POST" and path == "/v1/audio/voices":
                assert client.delete(f"{relay.url}/v1/audio/voices/{answer['id']}", headers=AUTH).status_code == 200
            if method == "POST" and path == "/v1/audio/voice_consents":
                assert client.delete(f"{relay.url}/v1/audio/voice_consents/{answer['id']}", headers=AUTH).status_code == 200
            if method == "DELETE" or (method == "POST" and path.startswith("/v1/audio/voice_consents/")):
                pytest.fail(f"changed something that does not exist: {method} {path} -> {answer}")
        else:
            assert response.status_code in (400, 404, 405, 413, 429), (response.status_code, answer)
            error = answer["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], answer
