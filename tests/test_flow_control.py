"""Per-stream flow control: a client that reads slowly holds back its own stream, nobody else's, and
the relay never buffers more than a stream's window. Real relay and node processes, real sockets;
measured in bytes, never in time."""

import asyncio
import json
import socket

import h11
import httpx
import numpy as np
import pytest
import websockets
from harness import API_KEY, Node, Relay, free_port, synthetic_models
from test_tunnel import AUTH, ScriptedNode, post_async, relay  # noqa: F401 (a fixture)

from local_node.engine.synthetic import synthetic_frames
from tunnel.protocol import (
    DEFAULT_WINDOW,
    MAX_AUDIO_PAYLOAD,
    SUBPROTOCOL,
    Audio,
    Cancel,
    Connection,
    Credit,
    End,
    Request,
    encode,
)

FRAME_BYTES = 1920 * 2  # one synthetic 80 ms frame as 16-bit pcm


class SlowReader:
    """An HTTP client on a raw socket with a tiny receive buffer, which reads only when told to."""

    def __init__(self, relay: Relay, body: dict) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the TCP window
        self.sock.connect(("127.0.0.1", relay.port))
        self.http = h11.Connection(h11.CLIENT)
        payload = json.dumps(body).encode()
        headers = [
            ("host", "relay"),
            ("authorization", f"Bearer {API_KEY}"),
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
        ]
        self.sock.sendall(
            self.http.send(h11.Request(method="POST", target="/v1/audio/speech", headers=headers))
            + self.http.send(h11.Data(data=payload))
            + self.http.send(h11.EndOfMessage())
        )

    def read_all(self) -> tuple[int, bytes]:
        """Read the whole response now: (status, body)."""
        status, body = None, bytearray()
        self.sock.settimeout(60)
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.sock.close()
                return status, bytes(body)


def tone(text: str) -> np.ndarray:
    """What the synthetic engine says for ``text``, as 16-bit pcm."""
    return (np.concatenate(list(synthetic_frames(text))) * 32767).astype(np.int16)


def assert_tone(body: bytes, text: str) -> None:
    samples = np.frombuffer(body, dtype="<i2")
    assert len(samples) == len(text) * 1920
    assert np.abs(samples.astype(np.int32) - tone(text)).max() <= 2


class Sender:
    """Drives a ScriptedNode's one stream: sends audio as far as its credit goes, never further."""

    def __init__(self, node: ScriptedNode, request: Request, audio: bytes) -> None:
        self.node, self.request, self.audio, self.sent = node, request, audio, 0

    async def send_within_credit(self) -> None:
        while self.sent < len(self.audio) and self.node.conn.credit(self.request.id):
            size = min(self.node.conn.credit(self.request.id), MAX_AUDIO_PAYLOAD, len(self.audio) - self.sent)
            await self.node.ws.send(self.node.conn.send(Audio(self.request.id, self.audio[self.sent : self.sent + size])))
            self.sent += size

    async def send_until_stalled(self, quiet: float = 3.0) -> None:
        """Send, take credit, send... until no credit has come for ``quiet`` seconds."""
        await self.send_within_credit()
        while True:
            try:
                message = await asyncio.wait_for(self.node.ws.recv(), quiet)
            except TimeoutError:
                return
            assert isinstance(self.node.conn.receive(message), Credit)
            await self.send_within_credit()


AUDIO = bytes(range(256)) * (16 * 1024 * 1024 // 256)  # more than loopback's socket buffers take
SLOW_PCM = {"model": "tts-1", "voice": "alloy", "input": "Hi", "response_format": "pcm"}


async def test_the_relay_grants_credit_only_as_the_client_reads(relay):
    """A scripted node that would send 16 MiB is held to the window plus what the sockets took (on
    loopback the kernel takes a few MB); when the client reads, the rest flows, whole and in order."""
    async with ScriptedNode(relay) as node:
        reader = await asyncio.to_thread(SlowReader, relay, SLOW_PCM)
        request = await node.next_message()
        assert isinstance(request, Request) and request.window == DEFAULT_WINDOW
        sender = Sender(node, request, AUDIO)
        await sender.send_within_credit()
        assert sender.sent == DEFAULT_WINDOW
        await sender.send_until_stalled()
        assert sender.sent < len(AUDIO) // 2, sender.sent  # the relay held back the rest
        assert node.conn.credit(request.id) < MAX_AUDIO_PAYLOAD

        reading = asyncio.create_task(asyncio.to_thread(reader.read_all))
        while sender.sent < len(AUDIO):
            assert isinstance(node.conn.receive(await asyncio.wait_for(node.ws.recv(), 10)), Credit)
            await sender.send_within_credit()
        await node.ws.send(node.conn.send(End(request.id, 1, 1)))
        status, body = await reading
        assert status == 200 and body == AUDIO


async def test_a_stalled_client_holds_back_no_other_stream_on_the_same_tunnel(relay):
    """Two streams of one node on one tunnel: the client that reads nothing stops its stream at its
    window plus what the sockets take, while the other stream carries 16 MiB through to its end."""
    async with ScriptedNode(relay) as node:
        slow_reader = await asyncio.to_thread(SlowReader, relay, SLOW_PCM)
        slow = await node.next_message()
        fast_response = asyncio.create_task(post_async(relay))
        fast = await node.next_message()
        assert isinstance(slow, Request) and isinstance(fast, Request) and slow.id != fast.id
        senders = {request.id: Sender(node, request, AUDIO) for request in (slow, fast)}
        for sender in senders.values():
            await sender.send_within_credit()
        while senders[fast.id].sent < len(AUDIO):
            message = await node.next_message()
            assert isinstance(message, Credit)
            await senders[message.id].send_within_credit()
        await node.ws.send(node.conn.send(End(fast.id, 1, 1)))
        response = await fast_response
        assert response.status_code == 200 and response.content == AUDIO
        assert senders[slow.id].sent < len(AUDIO) // 2, senders[slow.id].sent  # still held back
        slow_reader.sock.close()


async def test_a_node_that_sends_beyond_its_credit_is_disconnected(relay):
    async with ScriptedNode(relay) as node:
        reader = await asyncio.to_thread(SlowReader, relay, SLOW_PCM)
        request = await node.next_message()
        sender = Sender(node, request, AUDIO)
        await sender.send_until_stalled()
        overrun = node.conn.credit(request.id) + 1
        await node.ws.send(encode(Audio(request.id, b"x" * overrun)))  # by hand: the Connection would refuse
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await asyncio.wait_for(node.ws.recv(), 10)
        assert info.value.rcvd.code == 1002
        with pytest.raises(h11.RemoteProtocolError):  # the client's stream is cut, not completed
            await asyncio.to_thread(reader.read_all)


class ScriptedRelay:
    """A websocket server that speaks the relay's side of the protocol by hand, for a real node to dial."""

    def __init__(self) -> None:
        self.port = free_port()
        self.tunnel_url = f"ws://127.0.0.1:{self.port}/v1/tunnel"
        self.connected: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self):
        async def handler(ws):
            await self.connected.put(ws)
            await ws.wait_closed()

        def challenge(connection, request):  # any challenge will do: this relay checks no credential
            if request.path == "/v1/tunnel/challenge":
                return connection.respond(200, json.dumps({"challenge": "c" * 43, "expires_in": 30}))
            return None

        self.server = await websockets.serve(handler, "127.0.0.1", self.port, subprotocols=[SUBPROTOCOL], process_request=challenge)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


async def test_the_node_sends_no_more_than_its_credit_and_a_stalled_stream_holds_back_no_other(tmp_path):
    """Two requests for one model (one synthesis thread): the first gets no credit after its window,
    the second all it wants. The second completes in full while the first sits at exactly its
    window (its generator did not wait for the client, so the thread was free); then the first
    completes."""
    async with ScriptedRelay() as scripted:
        models = {"a": {"engine": "synthetic", "max_batch": 1, "voices": {"tone": {"speaker": "tone"}}}}
        with Node(tmp_path, scripted, models):
            ws = await asyncio.wait_for(scripted.connected.get(), 60)
            conn = Connection("relay")
            conn.receive(await ws.recv())  # hello
            window = 5000
            frames = 12
            for stream_id in (1, 2):
                await ws.send(
                    conn.send(Request(stream_id, f"req_{stream_id}", "a", "tone", "x" * frames, response_format="pcm", window=window))
                )
            received = {1: b"", 2: b""}
            while 2 in conn.open_streams:
                message = conn.receive(await asyncio.wait_for(ws.recv(), 30))
                if isinstance(message, Audio):
                    received[message.id] += message.data
                    if message.id == 2:
                        await ws.send(conn.send(Credit(2, len(message.data))))
            assert_tone(received[2], "x" * frames)
            assert len(received[1]) == window  # held back, though its audio is long made

            await ws.send(conn.send(Credit(1, frames * FRAME_BYTES)))
            while 1 in conn.open_streams:
                message = conn.receive(await asyncio.wait_for(ws.recv(), 30))
                if isinstance(message, Audio):
                    received[1] += message.data
            assert isinstance(message, End) and message.output_tokens == frames
            assert_tone(received[1], "x" * frames)


def test_a_slow_reader_holds_back_nobody_else(tmp_path):
    """The whole path: a client that reads nothing does not slow another stream of the same model on
    the same node; then it reads and gets every byte. (The tests above show the stall in bytes: on
    loopback the kernel's socket buffers alone take megabytes, too much to fill at real-time pace.)"""
    with Relay(tmp_path) as relay, Node(tmp_path, relay, synthetic_models()) as node:
        relay.wait_for_models({"tts-1"}, node=node, timeout=60)
        slow_frames, fast_frames = 30, 20
        slow = SlowReader(relay, {"model": "tts-1", "voice": "tone", "input": "s" * slow_frames, "response_format": "pcm", "speed": 0.25})
        node.wait_for_log(f"voice tone, {slow_frames} chars")
        fast = httpx.post(
            f"{relay.url}/v1/audio/speech",
            headers=AUTH,
            timeout=60,
            json={"model": "tts-1", "voice": "tone", "input": "f" * fast_frames, "response_format": "pcm"},
        )
        assert fast.status_code == 200
        assert_tone(fast.content, "f" * fast_frames)

        status, body = slow.read_all()
        assert status == 200 and abs(len(body) - slow_frames * FRAME_BYTES * 4) <= FRAME_BYTES  # atempo rounds
        node.wait_for_log(f"done, {slow_frames} frames", timeout=10)


async def test_a_client_that_takes_nothing_is_dropped_after_the_idle_timeout(tmp_path):
    """It would otherwise hold its place on the node for ever; the node is told to stop."""
    with Relay(tmp_path, env={"RELAY_STREAM_IDLE_TIMEOUT": "2"}) as relay:
        async with ScriptedNode(relay) as node:
            reader = await asyncio.to_thread(SlowReader, relay, SLOW_PCM)
            request = await node.next_message()
            sender = Sender(node, request, AUDIO)
            await sender.send_within_credit()
            while not isinstance(message := await node.next_message(), Cancel):
                assert isinstance(message, Credit)
                await sender.send_within_credit()
            assert sender.sent < len(AUDIO) // 2
            await asyncio.to_thread(relay.wait_for_log, "the client took no audio for 2 s; dropped")
            reader.sock.close()
