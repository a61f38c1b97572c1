"""Speech while the text is still being written (/v1/audio/speech/stream), through the whole product:
a websocket client speaking vLLM-Omni's protocol -> a real relay -> the tunnel -> a real node
running a tiny Qwen3-TTS checkpoint (real qwen-tts classes); the audio is decoded and checked."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time

import av
import httpx
import pytest
from harness import API_KEY, Node, Relay, free_port
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from local_node.testing.tiny_model import write_tiny_checkpoint
from tunnel.protocol import SUBPROTOCOL, Connection, Hello, ModelInfo, Request

METRICS_TOKEN = "metrics-token-0123456789"
ANSWER = "Hello there. This answer arrives word by word. And it is spoken while it is written."
FRAMES = 40  # per utterance: tiny checkpoints never say EOS


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    write_tiny_checkpoint(tmp / "custom_voice", "custom_voice")
    models = {
        "custom_voice": {
            "source": str(tmp / "custom_voice"),
            "aliases": ["tts-1"],
            "max_new_frames": FRAMES,
            "max_batch": 2,
            "voices": {"alloy": {"speaker": "vivian"}},
        },
        # Same weights, minutes of frames: for cancelling mid-utterance.
        "slow": {"source": str(tmp / "custom_voice"), "max_new_frames": 4000, "max_batch": 1, "max_queue": 0},
    }
    node_metrics = {"listen": f"127.0.0.1:{free_port()}", "token": METRICS_TOKEN}
    relay_env = {"RELAY_METRICS_TOKEN": METRICS_TOKEN, "RELAY_LIVE_IDLE_TIMEOUT": "2"}
    with Relay(tmp, env=relay_env) as relay, Node(tmp, relay, models, metrics=node_metrics) as node:
        relay.wait_for_models({"tts-1", "slow"}, node=node, timeout=300)
        node.metrics_url = f"http://{node_metrics['listen']}/metrics"
        yield relay, node


def url(relay: Relay) -> str:
    return relay.url.replace("http://", "ws://") + "/v1/audio/speech/stream"


AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def converse(relay: Relay, script: list, headers: dict | None = None, **connect_args) -> list:
    """Send ``script`` (messages; a number pauses that many seconds) while reading every event.
    Returns the events, [(seconds, kind, event or byte count)], the messages sent among them as
    ("sent", type); ends at the close or after the script once ``session.done`` came for each
    ``input.done``."""
    events: list = []
    started = time.monotonic()
    flushes = sum(1 for step in script if isinstance(step, dict) and step["type"] == "input.done")
    async with connect(url(relay), additional_headers=AUTH if headers is None else headers, **connect_args) as ws:

        async def read() -> None:
            done = 0
            try:
                async for message in ws:
                    at = time.monotonic() - started
                    if isinstance(message, bytes):
                        events.append((at, "audio", message))
                    else:
                        event = json.loads(message)
                        events.append((at, event["type"], event))
                        if event["type"] == "session.done":
                            done += 1
                            if done == flushes and not any(isinstance(s, dict) and s["type"] == "session.close" for s in script):
                                return
            except ConnectionClosed:
                pass
            events.append((time.monotonic() - started, "closed", (ws.close_code, ws.close_reason)))

        reader = asyncio.ensure_future(read())
        for step in script:
            if isinstance(step, (int, float)):
                await asyncio.sleep(step)
            else:
                events.append((time.monotonic() - started, "sent", step["type"]))
                await ws.send(json.dumps(step))
        await asyncio.wait_for(reader, 120)
    return events


def config(**fields) -> dict:
    return {"type": "session.config", "model": "tts-1", "voice": "alloy", "response_format": "wav", **fields}


def words(text: str, pause: float) -> list:
    script: list = []
    for word in text.split(" "):
        script += [{"type": "input.text", "text": word + " "}, pause]
    return script


def utterances(events: list) -> list[tuple[dict, bytes, dict]]:
    """(audio.start, its audio, audio.done) for each utterance, in order."""
    found, current = [], None
    for _, kind, event in events:
        if kind == "audio.start":
            current = (event, bytearray())
        elif kind == "audio" and current is not None:
            current[1].extend(event)
        elif kind == "audio.done" and current is not None:
            found.append((current[0], bytes(current[1]), event))
            current = None
    return found


def decoded_samples(audio: bytes, response_format: str) -> int:
    if response_format == "pcm":
        assert len(audio) % 2 == 0
        return len(audio) // 2
    with av.open(io.BytesIO(audio)) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


async def test_continuous_speech_begins_before_the_text_is_done_as_one_utterance(stack):
    relay, node = stack
    events = await converse(relay, [config(split_granularity="continuous"), *words(ANSWER, 0.1), {"type": "input.done"}])
    done_at = next(at for at, kind, event in events if kind == "sent" and event == "input.done")
    first_audio = next(at for at, kind, _ in events if kind == "audio")
    assert first_audio < done_at  # spoken while still being written
    (start, audio, done), *others = utterances(events)
    assert not others and start["sentence_index"] == 0 and done["error"] is False and done["total_bytes"] == len(audio)
    assert start["sample_rate"] == 24000 and start["format"] == "wav"
    assert decoded_samples(audio, "wav") == FRAMES * 1920  # one utterance, its whole frame budget
    assert [e for _, kind, e in events if kind == "session.done"] == [{"type": "session.done", "utterance_index": 0, "total_sentences": 1}]
    assert node.log().count("chars (live)") == 1


async def test_sentence_mode_speaks_each_sentence_as_it_is_complete(stack):
    relay, _ = stack
    events = await converse(
        relay, [config(split_granularity="sentence", response_format="mp3"), *words(ANSWER, 0.05), {"type": "input.done"}]
    )
    spoken = utterances(events)
    assert [start["sentence_text"] for start, _, _ in spoken] == [
        "Hello there.",
        "This answer arrives word by word.",
        "And it is spoken while it is written.",
    ]
    assert [start["sentence_index"] for start, _, _ in spoken] == [0, 1, 2]
    assert all(decoded_samples(audio, "mp3") > 0 for _, audio, _ in spoken)
    done_at = next(at for at, kind, event in events if kind == "sent" and event == "input.done")
    assert next(at for at, kind, _ in events if kind == "audio") < done_at  # the first sentence did not wait for the rest


async def test_each_input_done_ends_an_utterance_and_the_session_goes_on(stack):
    relay, _ = stack
    script: list = [config(split_granularity="continuous", response_format="pcm")]
    for text in ("First one.", "Second one.", "Third."):
        script += [{"type": "input.text", "text": text}, {"type": "input.done"}]
    script += [config(response_format="flac"), {"type": "input.text", "text": "A whole one."}, {"type": "input.done"}]
    events = await converse(relay, script)
    spoken = utterances(events)
    assert [(s["utterance_index"], s["format"]) for s, _, _ in spoken] == [(0, "pcm"), (1, "pcm"), (2, "pcm"), (3, "flac")]
    assert [s["sentence_text"] for s, _, _ in spoken] == ["First one.", "Second one.", "Third.", "A whole one."]
    assert [e["utterance_index"] for _, kind, e in events if kind == "session.done"] == [0, 1, 2, 3]
    assert all(decoded_samples(audio, start["format"]) > 0 for start, audio, _ in spoken)


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
async def test_live_audio_decodes_in_every_format(stack, response_format):
    relay, _ = stack
    events = await converse(
        relay,
        [
            config(split_granularity="continuous", response_format=response_format),
            *words("Every format works.", 0.05),
            {"type": "input.done"},
        ],
    )
    ((start, audio, done),) = utterances(events)
    assert start["format"] == response_format and done["total_bytes"] == len(audio)
    assert decoded_samples(audio, response_format) > 0


async def test_two_sessions_at_once_both_speak_while_they_write(stack):
    relay, _ = stack
    script = [config(split_granularity="continuous", response_format="pcm"), *words(ANSWER, 0.1), {"type": "input.done"}]
    both = await asyncio.gather(converse(relay, script), converse(relay, script))
    for events in both:
        done_at = next(at for at, kind, event in events if kind == "sent" and event == "input.done")
        assert next(at for at, kind, _ in events if kind == "audio") < done_at
        ((_, audio, _),) = utterances(events)
        assert len(audio) == FRAMES * 1920 * 2


async def test_vllm_omni_clients_older_forms_are_understood(stack):
    """``speaker`` for ``voice``, the streaming_mode name for continuous, fields we do not use."""
    relay, _ = stack
    script = [
        {
            "type": "session.config",
            "speaker": "alloy",
            "model": "tts-1",
            "streaming_mode": "token_level",
            "task_type": "CustomVoice",
            "stream_audio": True,
            "response_format": "pcm",
        },
        {"type": "input.text", "text": "Hi there, old client."},
        {"type": "input.commit"},  # unknown: an error event, and the session goes on
        config(response_format="mp3"),  # not while an utterance is being written: likewise
        {"type": "input.done"},
    ]
    events = await converse(relay, script)
    assert [e["code"] for _, kind, e in events if kind == "error"] == ["invalid_request", "utterance_in_progress"]
    assert [e["format"] for _, kind, e in events if kind == "audio.start"] == ["pcm"]
    assert len(utterances(events)) == 1


async def test_the_key_is_asked_for_at_the_handshake_in_a_header_or_subprotocol(stack):
    relay, _ = stack
    for headers in ({}, {"Authorization": "Bearer sk-wrong-0123456789abcdef"}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url(relay), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus):  # never in the URL
        async with connect(url(relay) + f"?api_key={API_KEY}"):
            pass
    events = await converse(
        relay,
        [config(response_format="pcm"), {"type": "input.text", "text": "Browser."}, {"type": "input.done"}],
        headers={},
        subprotocols=["realtime", f"openai-insecure-api-key.{API_KEY}"],
    )
    assert len(utterances(events)) == 1
    assert API_KEY not in relay.log()


@pytest.mark.parametrize(
    "script, reason, code",
    [
        ([{"type": "input.text", "text": "no config"}], "Expected session.config", 1008),
        ([config(), {"type": "input.text", "text": "x" * 40000}], "larger than", 1009),
        ([config()] + [{"type": "input.text", "text": "y" * 4000}] * 2, "longer than 4096", 1008),
        ([config(), {"type": "input.text", "text": "Then silence."}, 4], "Idle timeout", 1008),
    ],
)
async def test_limits_end_a_session_with_an_error_event_and_a_close_code(stack, script, reason, code):
    relay, _ = stack
    events = await converse(relay, script)
    errors = [e["message"] for _, kind, e in events if kind == "error"]
    assert errors and reason in errors[-1], events
    assert events[-1][1] == "closed" and events[-1][2][0] == code
    assert httpx.get(f"{relay.url}/health").status_code == 200


async def test_closing_the_session_stops_the_nodes_work_within_a_frame(stack):
    relay, node = stack
    script = [
        config(model="slow", voice="vivian", split_granularity="continuous", response_format="pcm"),
        {"type": "input.text", "text": "A long one."},
    ]
    script += [1.0, {"type": "session.close"}]
    events = await converse(relay, script)
    assert any(kind == "audio" for _, kind, _ in events)
    deadline = time.monotonic() + 10
    while "cancelled by the relay" not in node.log() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "cancelled by the relay" in node.log()


async def test_metrics_count_sessions_first_audio_and_text_waits(stack):
    relay, node = stack
    await converse(relay, [config(split_granularity="continuous", response_format="pcm"), *words(ANSWER, 0.05), {"type": "input.done"}])
    metrics = httpx.get(f"{relay.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert "relay_live_sessions_open 0.0" in metrics
    count = next(line for line in metrics.splitlines() if line.startswith("relay_live_first_audio_seconds_count"))
    assert float(count.split()[-1]) >= 1
    # The tiny model speaks far faster than the words come: it caught up and waited for text.
    on_node = httpx.get(node.metrics_url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    waits = next(line for line in on_node.splitlines() if line.startswith('node_live_text_waits_total{model="custom_voice"}'))
    seconds = next(line for line in on_node.splitlines() if line.startswith('node_live_text_wait_seconds_total{model="custom_voice"}'))
    assert float(waits.split()[-1]) >= 10 and float(seconds.split()[-1]) > 0


async def test_a_node_that_dies_mid_session_ends_it_with_an_error(tmp_path, stack):
    relay_dir = tmp_path
    write_tiny_checkpoint(relay_dir / "cv", "custom_voice")
    models = {
        "cv": {"source": str(relay_dir / "cv"), "aliases": ["dies"], "max_new_frames": 4000, "voices": {"alloy": {"speaker": "vivian"}}}
    }
    with Relay(relay_dir) as relay, Node(relay_dir, relay, models) as node:
        relay.wait_for_models({"dies"}, node=node, timeout=300)

        async def kill_soon() -> None:  # once it speaks
            while "chars (live)" not in node.log():
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            node.kill(signal.SIGKILL)

        killer = asyncio.ensure_future(kill_soon())
        events = await converse(
            relay,
            [
                config(model="dies", split_granularity="continuous", response_format="pcm"),
                {"type": "input.text", "text": "Going on and on."},
                5,
            ],
        )
        await killer
    errors = [e for _, kind, e in events if kind == "error"]
    assert errors and errors[-1]["code"] == "node_failed"
    assert events[-1][1] == "closed" and events[-1][2][0] == 1011


async def test_a_node_that_leaves_before_the_first_audio_is_replaced_with_all_the_text(tmp_path):
    """The first node the relay picks (a stand-in that takes the live request, then drops its
    tunnel) is replaced by a real one, which gets everything written so far, then the rest."""
    write_tiny_checkpoint(tmp_path / "cv", "custom_voice")
    models = {
        "cv": {"source": str(tmp_path / "cv"), "aliases": ["tts-1"], "max_new_frames": FRAMES, "voices": {"alloy": {"speaker": "vivian"}}}
    }
    with Relay(tmp_path) as relay:
        async with connect(relay.tunnel_url, additional_headers=relay.tunnel_headers(), subprotocols=[SUBPROTOCOL]) as stand_in:
            link = Connection("node")
            await stand_in.send(link.send(Hello("stand-in", (ModelInfo("cv", ("tts-1",), ("alloy",)),))))
            relay.wait_for_models({"tts-1"})
            with Node(tmp_path, relay, models) as node:
                relay.wait_for_ready(nodes=2, watch=(node,), timeout=300)

                async def leave_when_asked() -> str:
                    while not isinstance(message := link.receive(await stand_in.recv()), Request):
                        pass
                    await asyncio.sleep(0.3)  # more text arrives meanwhile
                    await stand_in.close()
                    return message.input

                leaving = asyncio.ensure_future(leave_when_asked())
                events = await converse(
                    relay, [config(split_granularity="continuous", response_format="pcm"), *words(ANSWER, 0.1), {"type": "input.done"}]
                )
                first_input = await leaving
    assert first_input == "Hello "  # the stand-in got the first word only
    ((start, audio, done),) = utterances(events)
    assert done["error"] is False and len(audio) == FRAMES * 1920 * 2
    chars = int(node.log().split(" chars (live)")[0].rsplit(", ", 1)[1])
    assert chars > len(first_input)  # the replacement got everything written until then
