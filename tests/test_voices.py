"""Voices people own, through the whole product: the openai SDK uploads a consent and a voice sample
to a real relay, which passes them through the tunnel to real nodes running tiny Qwen3-TTS
checkpoints (real qwen-tts classes); the nodes keep them on disk, and speech with the voice is
decoded and checked. Lists are read as Open WebUI and Home Assistant read them."""

from __future__ import annotations

import io
import os
import signal
import stat
import threading
import time
import wave
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
from harness import API_KEY, Node, Relay

from local_node.testing.tiny_model import write_tiny_checkpoint

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FRAME = 1920
MAX_FRAMES = 4


def wav(seconds: float = 3.0, rate: int = 16000, channels: int = 1, pitch: float = 220.0, level: float = 0.3) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tone = level * np.sin(2 * np.pi * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat((tone * 32767).astype("<i2"), channels).tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("voices")
    write_tiny_checkpoint(tmp / "base", "base")
    write_tiny_checkpoint(tmp / "custom_voice", "custom_voice")
    return tmp


def node_models(checkpoints: Path, base: bool = True, custom_voice: bool = True) -> dict:
    models = {}
    if base:
        models["base"] = {"source": str(checkpoints / "base"), "aliases": ["qwen-base"], "max_new_frames": MAX_FRAMES}
    if custom_voice:
        models["custom_voice"] = {
            "source": str(checkpoints / "custom_voice"),
            "aliases": ["tts-1"],
            "max_new_frames": MAX_FRAMES,
            "voices": {"alloy": {"speaker": "vivian"}},
        }
    return models


def start_node(tmp: Path, relay: Relay, checkpoints: Path, name: str, **kwargs) -> Node:
    return Node(tmp, relay, node_models(checkpoints, **kwargs), name=name, voices_dir=str(tmp / f"voices-{name}"))


def wait_for_voices(relay: Relay, wanted: set[str], node: Node, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        voices = httpx.get(f"{relay.url}/v1/audio/voices", headers=AUTH, timeout=10).json()["data"]
        if wanted <= {v["id"] for v in voices}:
            return voices
        assert node.proc.poll() is None, node.log()[-3000:]
        assert time.monotonic() < deadline, f"voices {wanted} never listed:\n{node.log()[-3000:]}"
        time.sleep(0.1)


def wait_for_nodes(relay: Relay, count: int, node: Node, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{relay.url}/ready", timeout=10).json().get("nodes") != count:
        assert node.proc.poll() is None and time.monotonic() < deadline, node.log()[-3000:]
        time.sleep(0.1)


def sdk(relay: Relay) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{relay.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def consent(client: openai.OpenAI) -> str:
    return client.audio.voice_consents.create(name="Me", language="en-US", recording=("consent.wav", wav(), "audio/wav")).id


def decoded_samples(audio: bytes) -> int:
    with av.open(io.BytesIO(audio)) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


@pytest.fixture(scope="module")
def stack(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    with Relay(tmp) as relay, start_node(tmp, relay, checkpoints, "home") as node:
        relay.wait_for_models({"base", "tts-1"}, node=node, timeout=300)
        yield relay, node, tmp / "voices-home"


def test_a_voice_is_uploaded_with_its_consent_and_spoken_under_any_model_name(stack):
    relay, node, folder = stack
    client = sdk(relay)
    recording = client.audio.voice_consents.create(name="Me", language="en-US", recording=("consent.mp3", wav(), "audio/wav"))
    assert recording.object == "audio.voice_consent" and recording.id.startswith("cons_") and recording.language == "en-US"
    assert recording.id in {c.id for c in client.audio.voice_consents.list()}
    assert client.audio.voice_consents.retrieve(recording.id).name == "Me"
    assert client.audio.voice_consents.update(recording.id, name="Me, renamed").name == "Me, renamed"
    assert client.audio.voice_consents.retrieve(recording.id).name == "Me, renamed"

    voice = client.audio.voices.create(
        name="Grandma",
        audio_sample=("grandma.wav", wav(4.0, pitch=180), "audio/wav"),
        consent=recording.id,
        extra_body={"ref_text": "Hello, this is Grandma speaking.", "language": "en-US"},
    )
    assert voice.object == "audio.voice" and voice.id.startswith("voice_") and voice.type == "audio_sample" and voice.name == "Grandma"

    # OpenAI's custom-voice form, the voice's name, and the OpenAI model names SDK examples use.
    for model, chosen, response_format in [
        ("tts-1", {"id": voice.id}, "wav"),
        ("gpt-4o-mini-tts", {"id": voice.id}, "mp3"),
        ("base", "Grandma", "flac"),
        ("qwen-base", voice.id, "pcm"),
    ]:
        audio = client.audio.speech.create(model=model, voice=chosen, input="Hi there.", response_format=response_format).content
        samples = len(audio) // 2 if response_format == "pcm" else decoded_samples(audio)
        assert samples >= FRAME, (model, chosen, samples)
    assert node.log().count(f"model base, voice {voice.id}") == 4  # every one went to the Base model

    listed = {v["id"]: v for v in httpx.get(f"{relay.url}/v1/audio/voices", headers=AUTH).json()["data"]}
    assert listed[voice.id]["models"] == ["base", "qwen-base"] and listed[voice.id]["name"] == "Grandma"
    assert httpx.get(f"{relay.url}/v1/audio/voices/{voice.id}", headers=AUTH).json()["name"] == "Grandma"
    # Kept privately: the node's user only; no recording or prompt in any log.
    entry = folder / "voices" / voice.id
    assert {p.name for p in entry.iterdir()} == {"voice.json", "sample.wav", "prompt-base.pt"}
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in entry.iterdir())
    assert "Hello, this is Grandma" not in node.log() + relay.log()

    deleted = client.audio.voices.delete(voice.id)
    assert deleted.deleted and deleted.object == "audio.voice.deleted"
    assert not entry.exists()
    with pytest.raises(openai.NotFoundError):
        client.audio.voices.delete(voice.id)
    with pytest.raises(openai.NotFoundError) as refused:
        client.audio.speech.create(model="tts-1", voice={"id": voice.id}, input="Gone?")
    assert refused.value.body["code"] == "voice_not_found"
    assert client.audio.voice_consents.delete(recording.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.audio.voice_consents.retrieve(recording.id)


def test_the_voice_list_reads_in_every_clients_shape(stack):
    """Open WebUI reads ``voices: [{id, name}]`` and ``models: [{id}]``; Home Assistant and most
    others the first list of ``data`` or ``voices`` with ``id`` and ``name``; the openai SDK none."""
    relay, node, _ = stack
    client = sdk(relay)
    voice = client.audio.voices.create(name="Reader", audio_sample=("r.wav", wav(), "audio/wav"), consent=consent(client))
    body = httpx.get(f"{relay.url}/v1/audio/voices", headers=AUTH).json()
    assert body["object"] == "list" and body["voices"] == body["data"]
    by_id = {v["id"]: v for v in body["voices"]}
    assert all(isinstance(v["id"], str) and isinstance(v["name"], str) for v in body["voices"])
    assert {"alloy", "vivian", voice.id} <= set(by_id)  # a mapped OpenAI name, a built-in speaker, an upload
    assert by_id["alloy"]["models"] == ["custom_voice", "tts-1"] and by_id["alloy"]["type"] == "preset"
    assert by_id[voice.id]["type"] == "audio_sample" and by_id[voice.id]["model"] == "base"
    models = httpx.get(f"{relay.url}/v1/audio/models", headers=AUTH).json()
    assert {"base", "qwen-base", "custom_voice", "tts-1"} == {m["id"] for m in models["models"]} == {m["id"] for m in models["data"]}
    assert {m["id"]: m["clones"] for m in models["data"]}["base"] is True
    for path in ("/v1/audio/voices", "/v1/audio/models", "/v1/models", f"/v1/audio/voices/{voice.id}", "/v1/audio/voice_consents"):
        assert httpx.get(f"{relay.url}{path}").status_code == 401, path
    client.audio.voices.delete(voice.id)


def test_unusable_recordings_are_refused_with_the_reason_and_nothing_is_kept(stack):
    relay, node, folder = stack
    client = sdk(relay)
    cons = consent(client)
    before = set(os.listdir(folder / "voices"))
    for sample, reason in [
        (b"this is not audio at all" * 100, "not audio"),
        (wav(3.0, level=0.0), "silent"),
        (wav(0.4), "too short"),
        (wav(65.0, rate=8000), "too long"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.voices.create(name="Bad", audio_sample=("bad.wav", sample, "audio/wav"), consent=cons)
        assert reason in refused.value.body["message"], refused.value.body
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.voice_consents.create(name="Me", language="en-US", recording=("c.wav", wav(3.0, level=0.0), "audio/wav"))
    assert "silent" in refused.value.body["message"]
    assert set(os.listdir(folder / "voices")) == before and os.listdir(folder / ".incoming") == []
    assert not [v for v in httpx.get(f"{relay.url}/v1/audio/voices", headers=AUTH).json()["data"] if v["name"] == "Bad"]


def test_a_consent_is_asked_for_and_must_exist(stack):
    relay, _, _ = stack
    client = sdk(relay)
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.voices.create(name="X", audio_sample=("x.wav", wav(), "audio/wav"), consent="")
    assert refused.value.body["param"] == "consent"
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.voices.create(name="X", audio_sample=("x.wav", wav(), "audio/wav"), consent="cons_nobody")
    assert "upload one first" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.voice_consents.create(name="Me", language="not a language", recording=("c.wav", wav(), "audio/wav"))
    assert refused.value.body["param"] == "language"
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.voices.create(name="X", prompt="A warm voice.", type="prompt")
    assert refused.value.body["param"] == "type"


def test_an_upload_many_frames_long_crosses_the_tunnel_and_one_too_large_is_refused(stack):
    relay, node, folder = stack
    client = sdk(relay)
    sample = wav(40.0, rate=48000, channels=2)  # 7.7 MB: over a hundred tunnel frames
    assert len(sample) > 100 * 64 * 1024
    voice = client.audio.voices.create(name="Long", audio_sample=("long.wav", sample, "audio/wav"), consent=consent(client))
    with wave.open(str(folder / "voices" / voice.id / "sample.wav")) as kept:
        assert kept.getframerate() == 24000 and kept.getnchannels() == 1 and abs(kept.getnframes() - 40 * 24000) < 2400
    client.audio.voices.delete(voice.id)
    with pytest.raises(openai.APIStatusError) as refused:
        client.audio.voices.create(name="Huge", audio_sample=("h.wav", b"\0" * (10 * 1024 * 1024 + 1), "audio/wav"), consent="cons_x")
    assert refused.value.status_code == 413


def test_the_operator_may_turn_off_consent_and_open_the_lists(checkpoints, tmp_path):
    env = {"RELAY_REQUIRE_VOICE_CONSENT": "false", "RELAY_PUBLIC_CATALOGUE": "true"}
    with Relay(tmp_path, env=env) as relay, start_node(tmp_path, relay, checkpoints, "open", custom_voice=False) as node:
        relay.wait_for_models({"base"}, node=node, timeout=300)
        client = sdk(relay)
        voice = client.audio.voices.create(name="Free", audio_sample=("f.wav", wav(), "audio/wav"), consent="")
        assert voice.id in {v["id"] for v in httpx.get(f"{relay.url}/v1/audio/voices").json()["voices"]}  # no key
        assert httpx.get(f"{relay.url}/v1/audio/models").status_code == 200
        assert httpx.get(f"{relay.url}/v1/audio/voice_consents").status_code == 401  # not a list clients need
        assert httpx.post(f"{relay.url}/v1/audio/speech", json={"model": "base", "voice": voice.id, "input": "x"}).status_code == 401


def test_voices_survive_a_node_restart_and_a_kill_mid_upload_leaves_nothing_half_written(checkpoints, tmp_path):
    with Relay(tmp_path) as relay:
        with start_node(tmp_path, relay, checkpoints, "restart", custom_voice=False) as node:
            relay.wait_for_models({"base"}, node=node, timeout=300)
            client = sdk(relay)
            voice = client.audio.voices.create(name="Kept", audio_sample=("k.wav", wav(), "audio/wav"), consent=consent(client))
        with start_node(tmp_path, relay, checkpoints, "restart", custom_voice=False) as again:
            wait_for_voices(relay, {voice.id}, again)
            audio = client.audio.speech.create(model="tts-1", voice={"id": voice.id}, input="Still here.", response_format="wav")
            assert decoded_samples(audio.content) >= FRAME

            # A large upload, and the node killed while it is sent, checked or kept (or, rarely,
            # just after): whichever moment it is, the voice comes back whole or not at all.
            failures: list[BaseException] = []
            agreed = consent(client)
            sample = wav(50.0, rate=48000, channels=2)

            def upload() -> None:
                try:
                    client.audio.voices.create(name="Cut", audio_sample=("c.wav", sample, "audio/wav"), consent=agreed)
                except BaseException as exc:
                    failures.append(exc)

            thread = threading.Thread(target=upload)
            thread.start()
            time.sleep(0.2)
            again.kill(signal.SIGKILL)
            thread.join(60)
            cut = not failures
            if failures:  # the node left mid-upload (502), or before it (503; or 400: its consent left with it)
                failure = failures[0]
                assert isinstance(failure, openai.APIStatusError), failures
                assert failure.status_code in (502, 503) or "No consent recording" in failure.message, failures
        with start_node(tmp_path, relay, checkpoints, "restart", custom_voice=False) as third:
            voices = wait_for_voices(relay, {voice.id}, third)
            assert ("Cut" in {v["name"] for v in voices}) == cut
            folder = tmp_path / "voices-restart"
            assert os.listdir(folder / ".incoming") == []
            for entry in (folder / "voices").iterdir():
                assert {p.name for p in entry.iterdir()} == {"voice.json", "sample.wav", "prompt-base.pt"}


def test_several_nodes_keep_the_same_voices_and_requests_go_where_the_voice_is(checkpoints, tmp_path):
    with (
        Relay(tmp_path) as relay,
        start_node(tmp_path, relay, checkpoints, "first") as first,
        start_node(tmp_path, relay, checkpoints, "second", custom_voice=False) as second,
    ):
        relay.wait_for_models({"base", "tts-1"}, node=first, timeout=300)
        wait_for_nodes(relay, 2, second)
        client = sdk(relay)
        voice = client.audio.voices.create(name="Both", audio_sample=("b.wav", wav(), "audio/wav"), consent=consent(client))
        for name in ("first", "second"):
            assert (tmp_path / f"voices-{name}" / "voices" / voice.id / "sample.wav").exists()
        client.audio.voices.delete(voice.id)
        for name in ("first", "second"):
            assert not (tmp_path / f"voices-{name}" / "voices" / voice.id).exists()

        # A voice only the first node keeps (the second one was away) is spoken only there.
        second.stop()
        only = client.audio.voices.create(name="Only", audio_sample=("o.wav", wav(), "audio/wav"), consent=consent(client))
        with start_node(tmp_path, relay, checkpoints, "second", custom_voice=False) as late:
            wait_for_nodes(relay, 2, late)
            for _ in range(4):
                client.audio.speech.create(model="base", voice={"id": only.id}, input="Where am I?", response_format="pcm")
            assert first.log().count(f"model base, voice {only.id}") == 4 and f"voice {only.id}" not in late.log()
