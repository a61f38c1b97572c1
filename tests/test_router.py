"""Which node gets a request: one whose model has the voice (or keeps it), least outstanding work first."""

from relay.router import Router
from relay.speech import routes
from relay.speech_request import SpeechRequest
from relay.tunnel_server import NodeSession
from tunnel.protocol import KeptVoice, ModelInfo

TONE = ModelInfo("tone", ("tts-1",), ("alloy",))
BASE = ModelInfo("base", ("qwen-base",), (), clones=True)
BIG_BASE = ModelInfo("big-base", (), (), clones=True)
GRANDMA = KeptVoice("voice_1", "Grandma", 100)


def session(name: str, outstanding: int, draining: bool = False, closed: bool = False, models=(TONE,), kept=()) -> NodeSession:
    node = NodeSession(websocket=None, name=name)  # type: ignore[arg-type]  # routing reads no socket
    node.models = {model.name: model for model in models}
    node.kept_voices = {voice.id: voice for voice in kept}
    node.streams = {i: None for i in range(outstanding)}  # type: ignore[misc]
    node.conn.peer_draining = draining
    node.closed = closed
    return node


def where(router: Router, model: str, voice: str) -> list[tuple[str, str, str]]:
    return [(r.node.name, r.model.name, r.voice) for r in routes(router, SpeechRequest(model, "Hi.", voice))]


def test_the_least_busy_ready_node_comes_first():
    router = Router()
    busy, idle = session("busy", 3), session("idle", 1)
    draining, gone = session("draining", 0, draining=True), session("gone", 0, closed=True)
    for node in (busy, draining, idle, gone):
        router.add(node)
    assert where(router, "tts-1", "alloy") == [("idle", "tone", "alloy"), ("busy", "tone", "alloy")]
    assert router.nodes == [busy, idle]
    assert where(router, "other", "alloy") == [] and where(router, "tts-1", "nobody") == []


def test_a_node_at_the_stream_cap_has_no_room_but_still_serves_the_model():
    router = Router(max_streams_per_node=2)
    full, room = session("full", 2), session("room", 1)
    for node in (full, room):
        router.add(node)
    assert [node.name for node, _ in router.serving("tts-1")] == ["room", "full"]  # the model exists: 429, not 404
    assert [router.has_room(node) for node in (room, full)] == [True, False]
    assert Router(max_streams_per_node=0).has_room(full)


def test_a_kept_voice_goes_to_a_node_that_keeps_it_on_the_model_that_speaks_it():
    """By id or name, whatever model the request names (tts-1, an OpenAI name, or the Base model
    itself, preferred where the node has two); never to a node without the voice."""
    router = Router()
    keeper = session("keeper", 2, models=(TONE, BASE, BIG_BASE), kept=(GRANDMA,))
    other_base = session("other", 0, models=(BASE,))
    for node in (keeper, other_base):
        router.add(node)
    assert where(router, "tts-1", "voice_1") == [("keeper", "base", "voice_1")]
    assert where(router, "gpt-4o-mini-tts", "Grandma") == [("keeper", "base", "voice_1")]
    assert where(router, "big-base", "voice_1") == [("keeper", "big-base", "voice_1")]
    assert where(router, "tts-1", "alloy") == [("keeper", "tone", "alloy")]
    assert where(router, "tts-1", "Grandpa") == []
    second = session("second", 1, models=(BASE,), kept=(GRANDMA,))
    router.add(second)
    assert where(router, "tts-1", "voice_1") == [("second", "base", "voice_1"), ("keeper", "base", "voice_1")]


def test_a_name_goes_to_a_models_own_voice_before_a_kept_voice_of_that_name():
    router = Router()
    router.add(session("n", 0, models=(TONE, BASE), kept=(KeptVoice("voice_2", "alloy", 1),)))
    assert where(router, "tts-1", "alloy") == [("n", "tone", "alloy")]
    assert where(router, "tts-1", "voice_2") == [("n", "base", "voice_2")]
