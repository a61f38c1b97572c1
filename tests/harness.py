"""Real relay and node processes on loopback, for tests that exercise the whole path."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx
import yaml

from tunnel.handshake import tunnel_authorization

API_KEY = "sk-test-0123456789abcdef"
NODE_TOKEN = "node-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process whose output goes to a log file the test can read."""

    started: list["Process"] = []  # conftest kills any left at the end of the session

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        Process.started.append(self)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared in {self.log_path}:\n{self.log()[-3000:]}")
            if self.proc.poll() is not None and text not in self.log():
                raise AssertionError(f"process exited ({self.proc.returncode}) before {text!r}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (with SIGCONT, so that a SIGSTOPped process takes it) and the log closed. Safe to
        call again, or after kill(). One still there after 30 s is killed, and the test fails."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.send_signal(signal.SIGCONT)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
                    raise
        finally:
            self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# The environment every test relay starts with (tests/test_fuzz_http.py serves one in process).
RELAY_ENV = {
    "RELAY_API_KEYS": f"test:{API_KEY}",
    "RELAY_NODE_TOKENS": f"home:{NODE_TOKEN}",
    "RELAY_FIRST_AUDIO_TIMEOUT": "60",
    "RELAY_STREAM_IDLE_TIMEOUT": "20",
    "RELAY_RETRY_AFTER": "1",
    # Off: most tests send many requests at once with one key. tests/test_limits.py sets them.
    "RELAY_RATE_LIMIT": "0",
    "RELAY_MAX_STREAMS_PER_KEY": "0",
    "RELAY_CHALLENGE_RATE_LIMIT": "0",
}


class Relay(Process):
    def __init__(self, tmp: Path, env: dict[str, str] | None = None, port: int | None = None, args: tuple = ()) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tunnel_url = f"ws://127.0.0.1:{self.port}/v1/tunnel"
        super().__init__(
            [sys.executable, "-m", "relay", "--port", str(self.port), *args], {**RELAY_ENV, **(env or {})}, tmp / f"relay-{self.port}.log"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"relay did not start:\n{self.log()}")
            time.sleep(0.05)

    def tunnel_headers(self, token: str = NODE_TOKEN) -> dict[str, str]:
        """The handshake headers of a node holding ``token``, with a fresh challenge from this relay."""
        challenge = httpx.get(f"{self.url}/v1/tunnel/challenge", timeout=5).json()["challenge"]
        return {"Authorization": tunnel_authorization(token, challenge)}

    def models(self) -> set[str]:
        response = httpx.get(f"{self.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
        return {m["id"] for m in response.json()["data"]}

    def ready(self) -> dict:
        """GET /ready's answer: {"status": "ready" | "draining" | "no node connected", "nodes": n}."""
        return httpx.get(f"{self.url}/ready", timeout=5).json()

    def wait_for_ready(self, timeout: float = 60.0, watch: tuple[Process, ...] = (), **expected) -> None:
        """Poll GET /ready until its answer has ``expected`` (``nodes=2``: two nodes that take new
        work, connected and not draining; ``status="draining"``), failing early if a watched process exits."""
        deadline = time.monotonic() + timeout
        while not expected.items() <= (answer := self.ready()).items():
            for process in watch:
                if process.proc.poll() is not None:
                    raise AssertionError(f"{process.log_path.name} exited ({process.proc.returncode}):\n{process.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"GET /ready never had {expected}: {answer}")
            time.sleep(0.05)

    def wait_for_models(self, names: set[str], timeout: float = 180.0, node: Process | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not names <= self.models():
            if node is not None and node.proc.poll() is not None:
                raise AssertionError(f"node exited ({node.proc.returncode}):\n{node.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"models {names} never appeared; node log:\n{node.log()[-4000:] if node else ''}")
            time.sleep(0.1)


class Node(Process):
    def __init__(
        self,
        tmp: Path,
        relay: Relay | list[Relay],
        models: dict,
        name: str = "node",
        token: str = NODE_TOKEN,
        env: dict[str, str] | None = None,
        relay_options: dict | None = None,
        **extra,
    ) -> None:
        url = [r.tunnel_url for r in relay] if isinstance(relay, list) else relay.tunnel_url  # several relays
        config = {
            "relay": {"url": url, "token_env": "TEST_NODE_TOKEN", "node_name": name, **(relay_options or {})},
            "dtype": "bfloat16",
            "threads": 1,
            "models": models,
            **extra,
        }
        config_path = tmp / f"node-{name}-{free_port()}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        super().__init__(
            [sys.executable, "-m", "local_node", "--config", str(config_path)],
            {"TEST_NODE_TOKEN": token, **(env or {})},
            tmp / f"{config_path.stem}.log",
        )


def synthetic_models(name: str = "tone", aliases: tuple[str, ...] = ("tts-1",), max_queue: int = 4, max_batch: int = 1) -> dict:
    """max_batch 1 by default: one synthesis at a time, so tests can tell running from queued."""
    return {
        name: {
            "engine": "synthetic",
            "aliases": list(aliases),
            "max_queue": max_queue,
            "max_batch": max_batch,
            "voices": {"alloy": {"speaker": "tone"}, "tone": {"speaker": "tone"}},
        }
    }
