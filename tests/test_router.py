"""Which node gets a request: the ready one with the least outstanding work."""

from relay.router import Router
from relay.tunnel_server import NodeSession
from tunnel.protocol import ModelInfo

TONE = ModelInfo("tone", ("tts-1",), ("alloy",))


def session(name: str, outstanding: int, draining: bool = False, closed: bool = False) -> NodeSession:
    node = NodeSession(websocket=None, name=name)  # type: ignore[arg-type]  # routing reads no socket
    node.models = {TONE.name: TONE}
    node.streams = {i: None for i in range(outstanding)}  # type: ignore[misc]
    node.conn.peer_draining = draining
    node.closed = closed
    return node


def test_the_least_busy_ready_node_comes_first():
    router = Router()
    busy, idle = session("busy", 3), session("idle", 1)
    draining, gone = session("draining", 0, draining=True), session("gone", 0, closed=True)
    for node in (busy, draining, idle, gone):
        router.add(node)
    assert [node.name for node, _ in router.candidates("tts-1")] == ["idle", "busy"]
    assert router.nodes == [busy, idle]
    assert router.candidates("other") == []


def test_a_node_at_the_stream_cap_is_no_candidate_but_still_serves_the_model():
    router = Router(max_streams_per_node=2)
    full, room = session("full", 2), session("room", 1)
    for node in (full, room):
        router.add(node)
    assert [node.name for node, _ in router.candidates("tts-1")] == ["room"]
    assert [node.name for node, _ in router.serving("tts-1")] == ["room", "full"]  # the model exists: 429, not 404
    room.streams[1] = None  # type: ignore[assignment]
    assert router.candidates("tts-1") == []
    uncapped = Router(max_streams_per_node=0)
    uncapped.add(full)
    assert [node.name for node, _ in uncapped.candidates("tts-1")] == ["full"]
