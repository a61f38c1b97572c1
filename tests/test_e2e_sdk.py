"""The whole product: the official openai SDK -> relay -> websocket tunnel -> node running tiny
Qwen3-TTS checkpoints (real qwen-tts classes, random weights) in bf16 -> audio back, decoded and checked."""

import base64
import io
import json
import subprocess
import sys
from datetime import datetime

import av
import numpy as np
import openai
import pytest
import soundfile
from harness import API_KEY, Node, Relay

from local_node.testing.tiny_model import write_tiny_checkpoint

FRAME = 1920  # samples per codec frame at 24 kHz
MAX_FRAMES = 6  # per text piece; tiny checkpoints never say EOS, so every piece is exactly this long
TWO_PIECES = "A" * 200 + ". " + "B" * 200 + "."  # too long for one piece (300 characters): two


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    # One checkpoint through the CLI a user would run, the others through the same function.
    subprocess.run(
        [sys.executable, "-m", "local_node", "tiny-model", str(tmp / "custom_voice"), "--type", "custom_voice"],
        check=True,
        capture_output=True,
    )
    write_tiny_checkpoint(tmp / "base", "base")
    write_tiny_checkpoint(tmp / "voice_design", "voice_design")
    t = np.arange(24000 * 2) / 24000
    soundfile.write(tmp / "ref.wav", (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 24000)

    models = {
        "custom_voice": {
            "source": str(tmp / "custom_voice"),
            "aliases": ["tts-1", "gpt-4o-mini-tts"],
            "max_new_frames": MAX_FRAMES,
            "voices": {"alloy": {"speaker": "vivian"}},
            "text_input": "streaming",
        },
        "base_small": {
            "source": str(tmp / "base"),
            "aliases": ["qwen3-tts-clone"],
            "max_new_frames": MAX_FRAMES,
            "voices": {
                "me": {"ref_audio": str(tmp / "ref.wav"), "ref_text": "A short reference clip."},
                "timbre": {"ref_audio": str(tmp / "ref.wav")},
            },
        },
        # Same weights, one piece of text takes minutes: for cancelling mid-generation.
        "slow": {"source": str(tmp / "custom_voice"), "max_new_frames": 4000, "max_batch": 1, "max_queue": 0},
        "slow_batched": {"source": str(tmp / "custom_voice"), "max_new_frames": 4000, "max_batch": 2, "max_queue": 0},
        "voice_design": {
            "source": str(tmp / "voice_design"),
            "aliases": ["qwen3-tts-design"],
            "max_new_frames": MAX_FRAMES,
            "voices": {"narrator": {"description": "A calm narrator."}},
        },
    }
    with Relay(tmp) as relay, Node(tmp, relay, models) as node:
        relay.wait_for_models({"tts-1", "base_small", "voice_design", "slow", "slow_batched"}, node=node, timeout=600)
        yield relay, node


@pytest.fixture(scope="module")
def client(stack):
    relay, _ = stack
    return openai.OpenAI(base_url=f"{relay.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def decode(data: bytes, response_format: str) -> tuple[np.ndarray, int, int]:
    """(mono samples, sample rate, channels) of an encoded response."""
    if response_format == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, 24000, 1
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
        return samples, stream.rate, stream.channels


# Encoder priming/padding that mp3 and ADTS cannot signal, in seconds; Opus decodes at 48 kHz.
SLACK = {"mp3": 0.1, "aac": 0.1, "opus": 0.0, "flac": 0.0, "wav": 0.0, "pcm": 0.0}
RATE = {"opus": 48000}


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format_decodes_to_the_right_audio(client, response_format):
    response = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there, how are you?", response_format=response_format)
    content_type = {
        "mp3": "audio/mpeg",
        "opus": "audio/opus",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }[response_format]
    assert response.response.headers["content-type"] == content_type
    assert response.response.headers.get("transfer-encoding") == "chunked"
    samples, rate, channels = decode(response.content, response_format)
    assert (rate, channels) == (RATE.get(response_format, 24000), 1)
    seconds = len(samples) / rate
    # between 2 frames (qwen-tts's minimum) and the cap, plus what the codec adds
    assert 2 * FRAME / 24000 - 0.001 <= seconds <= MAX_FRAMES * FRAME / 24000 + SLACK[response_format] + 0.001
    if response_format in ("wav", "flac", "pcm"):
        assert len(samples) % FRAME == 0  # lossless: whole codec frames, nothing added or lost
    assert np.isfinite(samples).all() and np.abs(samples).max() > 0


def test_streaming_response_delivers_audio_before_synthesis_ends(stack, client):
    relay, node = stack
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=TWO_PIECES, response_format="pcm"
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = response.iter_bytes()
        first = next(chunks)
        first_at = datetime.now()
        rest = b"".join(chunks)
    done_at, _ = _done_line(node, request_id)
    assert first_at < done_at, "the first bytes must arrive while the node is still generating"
    assert len(first + rest) == 2 * MAX_FRAMES * FRAME * 2  # both pieces, 16-bit samples


@pytest.mark.parametrize("response_format", ["mp3", "wav", "opus", "pcm"])
def test_sse_deltas_concatenate_to_valid_audio(client, response_format):
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice={"id": "alloy"},
        input=TWO_PIECES,
        response_format=response_format,
        stream_format="sse",
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= 2 and all(e["type"] == "speech.audio.delta" for e in deltas)
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] == 2 * MAX_FRAMES
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    samples, rate, _ = decode(audio, response_format)
    assert abs(len(samples) / rate - usage["output_tokens"] * FRAME / 24000) <= SLACK[response_format] + 0.001


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_changes_duration(client, speed):
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Speed check.", response_format="wav", speed=speed, stream_format="sse"
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    samples, rate, _ = decode(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "wav")
    expected = events[-1]["usage"]["output_tokens"] * FRAME / 24000 / speed
    assert abs(len(samples) / rate - expected) < 0.03 * expected + 0.01


def test_cloned_voices_on_the_base_model(client):
    for voice in ("me", "timbre"):  # in-context cloning, and x-vector only
        samples, rate, _ = decode(
            client.audio.speech.create(model="qwen3-tts-clone", voice=voice, input="Cloned.", response_format="wav").content, "wav"
        )
        assert rate == 24000 and len(samples) >= 2 * FRAME
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="qwen3-tts-clone", voice="alloy", input="Hi")


def test_voice_design_takes_its_voice_from_instructions(client):
    response = client.audio.speech.create(
        model="voice_design", voice="anything-goes", input="Designed.", instructions="A bright young female voice.", response_format="flac"
    )
    assert len(decode(response.content, "flac")[0]) >= 2 * FRAME
    response = client.audio.speech.create(model="qwen3-tts-design", voice="narrator", input="Configured.", response_format="pcm")
    assert len(response.content) >= 2 * FRAME * 2
    with pytest.raises(openai.BadRequestError, match="instructions"):
        client.audio.speech.create(model="voice_design", voice="anything-goes", input="No description.")


def test_models_and_voices_list_what_the_node_serves(stack, client):
    ids = {m.id for m in client.models.list()}
    assert {"custom_voice", "tts-1", "gpt-4o-mini-tts", "base_small", "qwen3-tts-clone", "voice_design"} <= ids
    relay, _ = stack
    import httpx

    auth = {"Authorization": f"Bearer {API_KEY}"}
    voices = {v["id"]: v["models"] for v in httpx.get(f"{relay.url}/v1/audio/voices", headers=auth).json()["data"]}
    assert {"vivian", "ryan", "alloy"} <= {name for name, models in voices.items() if "custom_voice" in models}
    assert voices["me"] == voices["timbre"] == ["base_small", "qwen3-tts-clone"]
    models = {m["id"]: m for m in httpx.get(f"{relay.url}/v1/audio/models", headers=auth).json()["data"]}
    assert models["voice_design"]["any_voice"] is True and models["base_small"]["clones"] is True


def test_concurrent_requests_are_served_together(client):
    """Two requests for one model at once: generated in one batch, frame by frame; both complete."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda _: client.audio.speech.create(model="tts-1", voice="alloy", input="Queued.", response_format="pcm").content, range(2)
            )
        )
    assert all(len(r) >= 2 * FRAME * 2 for r in results)


def _done_line(node, request_id: str) -> tuple[datetime, int]:
    node.wait_for_log(f"{request_id}: done", timeout=30)
    line = next(line for line in node.log().splitlines() if f"{request_id}: done" in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), int(line.split("done, ")[1].split(" frames")[0])


@pytest.mark.parametrize(
    "response_format, stream_format",
    [
        ("mp3", "audio"),
        ("opus", "audio"),
        ("aac", "audio"),
        ("flac", "audio"),
        ("wav", "audio"),
        ("pcm", "audio"),
        ("mp3", "sse"),
        ("pcm", "sse"),
    ],
)
def test_first_audio_arrives_while_the_node_is_still_generating(stack, client, response_format, stream_format):
    """The 'slow' model may generate 4000 frames (minutes). The client takes the first bytes and
    hangs up; the node's log then shows the request ended, cancelled, after a few frames, later
    than the bytes arrived. max_batch is 1 and max_queue 0, so each next case also proves the
    model was freed."""
    relay, node = stack
    with client.audio.speech.with_streaming_response.create(
        model="slow",
        voice="vivian",
        input="One long sentence.",
        response_format=response_format,
        stream_format=stream_format,
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = response.iter_bytes()  # kept: dropping the iterator would close the response
        first = next(chunks)
        first_at = datetime.now()
    assert first
    if stream_format == "sse":
        assert first.startswith(b'data: {"type":"speech.audio.delta"')
    done_at, frames = _done_line(node, request_id)
    assert first_at < done_at
    assert 1 <= frames < 4000  # the first chunk is 1 frame; generation stopped long before the cap
    assert f"{request_id}: cancelled by the relay" in node.log()


def test_a_newcomer_streams_while_another_stream_is_still_generating(stack, client):
    """Continuous batching: with a stream of up to 4000 frames (minutes) running, a second request
    for the same model gets its first audio before the first one has finished: it joined the
    batch between frames instead of waiting. Both are then cancelled, long before their caps."""
    relay, node = stack
    speak = dict(model="slow_batched", voice="vivian", input="One long sentence.", response_format="pcm")
    with client.audio.speech.with_streaming_response.create(**speak) as first:
        first_chunks = first.iter_bytes()
        assert next(first_chunks)
        with client.audio.speech.with_streaming_response.create(**speak) as second:
            second_chunks = second.iter_bytes()
            assert next(second_chunks)
            assert f"{first.headers['x-request-id']}: done" not in node.log()  # still generating
            assert next(first_chunks)  # and still streaming to its client
    for response in (first, second):
        _, frames = _done_line(node, response.headers["x-request-id"])
        assert 1 <= frames < 4000


@pytest.mark.parametrize("tier", ["avx2", "portable"])
def test_every_format_on_a_lower_tier(tmp_path, tier):
    """The node on a CPU with less: QWEN3_TTS_ISA caps our kernels, and the node caps oneDNN and
    ATen to match (avx2); portable runs no compiled code of ours, here under oneDNN and ATen capped
    at AVX2 too: an AVX2 box without a C compiler. The log names the tier; every format decodes."""
    from local_node.kernels import cpu_kernels

    if tier != "portable" and cpu_kernels.kernels(tier) is None:
        pytest.skip(f"the {tier} kernels do not run on this CPU")
    env = {"QWEN3_TTS_ISA": tier}
    if tier == "portable":
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    write_tiny_checkpoint(tmp_path / "custom_voice", "custom_voice")
    models = {
        "custom_voice": {
            "source": str(tmp_path / "custom_voice"),
            "aliases": ["tts-1"],
            "max_new_frames": MAX_FRAMES,
            "voices": {"alloy": {"speaker": "vivian"}},
        }
    }
    with Relay(tmp_path) as relay, Node(tmp_path, relay, models, env=env) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=600)
        assert f"kernels: {tier} (" in node.log()
        if tier == "avx2":
            assert "ONEDNN_MAX_CPU_ISA=AVX2" in node.log() and "ATEN_CPU_CAPABILITY=avx2" in node.log()
        client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        for response_format in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
            response = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.", response_format=response_format)
            samples, rate, channels = decode(response.content, response_format)
            assert (rate, channels) == (RATE.get(response_format, 24000), 1), response_format
            assert len(samples) / rate >= 2 * FRAME / 24000 - 0.001 and np.isfinite(samples).all(), response_format
            assert np.abs(samples).max() > 0, response_format
