"""What the relay and the tunnel cost, measured with the synthetic engine (no model in the way).

    ./bench.sh tunnel                                  # the full run, a few minutes
    ./bench.sh tunnel --requests 50 --levels 1 10      # a quick one

Two servers on loopback, each a subprocess, each running the node's own ModelWorker and
SyntheticEngine (a steady tone, one 80 ms frame per input character, at real-time pace), asked
for ``response_format=pcm`` by the same async httpx client:

  relay   a real relay (``python -m relay``) and a real node (``python -m local_node``) dialled
          into it: client -> HTTP -> relay -> websocket tunnel -> node, and back.
  direct  "straight from the node": a minimal Starlette app (in this file) that serves
          ``POST /v1/audio/speech`` by calling a ModelWorker in process, under uvicorn.

1. Time to first byte (request sent -> first audio byte), p50 and p99, at 1, 10 and 50 streams at
   once (closed loop: each of N workers sends its next request when the last one ends), for
   ``--requests`` requests per level and server; the difference is what the relay and tunnel add.
2. Load: ``--load-streams`` (100) concurrent streams of ``--load-frames`` frames (50: 4 s of
   audio) through the relay, twice. Every stream must complete with exactly its PCM length and the
   tone it should carry (nothing lost, duplicated or reordered). The relay's resident memory is
   sampled from /proc during both rounds: idle, peak, after; bounded means the second round
   peaks no higher than the first.

Prints a table and writes ``bench/results/tunnel.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from local_node.__main__ import physical_cores
from local_node.engine.synthetic import synthetic_frames

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
API_KEY, NODE_TOKEN = "sk-bench-0123456789abcdef", "node-bench-0123456789abcdef"
FRAME_SAMPLES, RATE = 1920, 24000
FRAME_BYTES = FRAME_SAMPLES * 2  # 16-bit pcm
MODEL = {"engine": "synthetic", "aliases": ["tts-1"], "voices": {"tone": {"speaker": "tone"}}}


# --- "straight from the node": the node's worker behind a bare HTTP endpoint ------------------


def direct_app(max_batch: int, max_queue: int):
    """POST /v1/audio/speech answered by a ModelWorker in this process: the node without tunnel
    or relay. Only what the bench sends is understood."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from local_node.config import ModelConfig, VoiceConfig
    from local_node.engine.synthetic import SyntheticEngine
    from local_node.serving.worker import ModelWorker
    from tunnel.protocol import Request

    config = ModelConfig(
        "tone", True, "", ("tts-1",), "synthetic", voices=(VoiceConfig("tone", speaker="tone"),), max_queue=max_queue, max_batch=max_batch
    )
    worker = ModelWorker(SyntheticEngine(config), config.max_queue)

    async def speech(request):
        body = await request.json()
        job = Request(1, "direct", "tone", body["voice"], body["input"], response_format=body["response_format"])
        chunks: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        async def synthesize() -> None:
            try:
                await worker.run(job, cancelled, chunks.put)
            finally:
                await chunks.put(None)

        task = asyncio.create_task(synthesize())

        async def audio():
            try:
                while (chunk := await chunks.get()) is not None:
                    yield chunk
            finally:
                cancelled.set()
                await task

        return StreamingResponse(audio(), media_type="audio/pcm")

    return Starlette(routes=[Route("/v1/audio/speech", speech, methods=["POST"])])


def serve_direct(port: int, max_batch: int, max_queue: int) -> None:
    import uvicorn

    uvicorn.run(direct_app(max_batch, max_queue), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the servers, as subprocesses --------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Servers:
    """A relay with a node dialled in, and the direct server; all on loopback."""

    def __init__(self, workdir: Path, max_batch: int, max_queue: int) -> None:
        import yaml

        self.relay_port, self.direct_port = free_port(), free_port()
        self.relay_url = f"http://127.0.0.1:{self.relay_port}"
        self.direct_url = f"http://127.0.0.1:{self.direct_port}"
        env = {
            **os.environ,
            "RELAY_API_KEYS": f"bench:{API_KEY}",
            "RELAY_NODE_TOKENS": f"bench:{NODE_TOKEN}",
            "BENCH_NODE_TOKEN": NODE_TOKEN,
            # Limits off: the bench is one client key sending everything at once, on purpose.
            "RELAY_RATE_LIMIT": "0",
            "RELAY_MAX_STREAMS_PER_KEY": "0",
            "RELAY_MAX_STREAMS_PER_NODE": "0",
        }
        config = {
            "relay": {"url": f"ws://127.0.0.1:{self.relay_port}/v1/tunnel", "token_env": "BENCH_NODE_TOKEN", "node_name": "bench"},
            "models": {"tone": {**MODEL, "max_batch": max_batch, "max_queue": max_queue}},
        }
        (workdir / "node.yaml").write_text(yaml.safe_dump(config))
        self.logs = {name: open(workdir / f"{name}.log", "wb") for name in ("relay", "node", "direct")}
        self.procs: dict[str, subprocess.Popen] = {}
        self._start("relay", [sys.executable, "-m", "relay", "--port", str(self.relay_port), "--log-level", "warning"], env)
        self._start("node", [sys.executable, "-m", "local_node", "--config", str(workdir / "node.yaml")], env)
        self._start(
            "direct",
            [
                sys.executable,
                "-m",
                "bench.tunnel",
                "--serve-direct",
                str(self.direct_port),
                "--max-batch",
                str(max_batch),
                "--max-queue",
                str(max_queue),
            ],
            env,
        )
        self.workdir = workdir
        self._wait(lambda: "tts-1" in self._models(), "the node to connect")
        self._wait(lambda: self._status(self.direct_url + "/v1/audio/speech", "GET") == 405, "the direct server")

    @property
    def relay_pid(self) -> int:
        return self.procs["relay"].pid

    def close(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs.values():
            log.close()

    def relay_log(self) -> str:
        return (self.workdir / "relay.log").read_text(errors="replace")

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.procs[name] = subprocess.Popen(args, env=env, stdout=self.logs[name], stderr=subprocess.STDOUT, cwd=ROOT)

    def _models(self) -> set[str]:
        try:
            response = httpx.get(self.relay_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=2)
            return {m["id"] for m in response.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return set()

    @staticmethod
    def _status(url: str, method: str) -> int | None:
        try:
            return httpx.request(method, url, timeout=2).status_code
        except httpx.HTTPError:
            return None

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SystemExit(
                        f"waiting for {what}: {name} exited\n" + (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                    )
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.1)


# --- one request, many requests ----------------------------------------------------------------


async def speak(client: httpx.AsyncClient, base_url: str, text: str) -> tuple[float, bytes]:
    """(seconds from sending to the first audio byte, the whole body)."""
    body = {"model": "tts-1", "voice": "tone", "input": text, "response_format": "pcm"}
    started = time.perf_counter()
    first = None
    chunks = []
    async with client.stream("POST", base_url + "/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{base_url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for chunk in response.aiter_raw():
            if chunk and first is None:
                first = time.perf_counter() - started
            chunks.append(chunk)
    return first if first is not None else time.perf_counter() - started, b"".join(chunks)


async def closed_loop(client: httpx.AsyncClient, base_url: str, streams: int, requests: int, text: str) -> list[float]:
    """``requests`` requests from ``streams`` workers at once; each worker sends its next when
    the last one ends. Time to first byte of each, in seconds.

    The workers start spread over one request's duration, so that requests arrive evenly, as
    from independent clients, rather than in waves of ``streams`` at the same instant."""
    ttfb: list[float] = []
    remaining = iter(range(requests))
    expected = len(text) * FRAME_BYTES
    spacing = len(text) * FRAME_SAMPLES / RATE / streams

    async def worker(k: int) -> None:
        await asyncio.sleep(k * spacing)
        for _ in remaining:
            first, body = await speak(client, base_url, text)
            if len(body) != expected:
                raise RuntimeError(f"{base_url}: {len(body)} bytes instead of {expected}")
            ttfb.append(first)

    await asyncio.gather(*(worker(k) for k in range(streams)))
    return ttfb


def client_for(streams: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    return httpx.AsyncClient(timeout=120, limits=limits)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    return float(np.percentile(values, q))


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in seconds]
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": float(np.mean(ms)),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "n": len(ms),
    }


async def ttfb_level(servers: Servers, streams: int, requests: int, text: str) -> dict:
    """Both servers at one concurrency, in alternating halves so that a slow spell of the machine
    hits both. Each server's client keeps its connections (as an SDK client does), opened by a
    first unmeasured request per worker: the relay's cost, not TCP's, is what is measured."""
    relay: list[float] = []
    direct: list[float] = []
    async with client_for(streams) as direct_client, client_for(streams) as relay_client:
        await closed_loop(direct_client, servers.direct_url, streams, streams, text)
        await closed_loop(relay_client, servers.relay_url, streams, streams, text)
        for part in (requests // 2, requests - requests // 2):
            direct += await closed_loop(direct_client, servers.direct_url, streams, part, text)
            relay += await closed_loop(relay_client, servers.relay_url, streams, part, text)
    result = {"streams": streams, "requests": requests, "relay": summary(relay), "direct": summary(direct)}
    result["added_p50_ms"] = result["relay"]["p50_ms"] - result["direct"]["p50_ms"]
    result["added_p99_ms"] = result["relay"]["p99_ms"] - result["direct"]["p99_ms"]
    return result


# --- load: many long streams through the relay -----------------------------------------------


def tone(text: str) -> np.ndarray:
    """The synthetic engine's tone for ``text``, as the node's pcm encoder writes it."""
    pcm = np.concatenate(list(synthetic_frames(text)))
    return np.round(np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


class RssSampler:
    """A process's resident memory (VmRSS), sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.rss_kib())
            time.sleep(self.interval)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def load_round(servers: Servers, streams: int, frames: int) -> dict:
    text = "x" * frames
    expected = tone(text)
    cpu = cpu_seconds(servers.relay_pid)
    started = time.perf_counter()
    with RssSampler(servers.relay_pid) as rss:
        async with client_for(streams) as client:
            results = await asyncio.gather(*(speak(client, servers.relay_url, text) for _ in range(streams)), return_exceptions=True)
    wall = time.perf_counter() - started
    cpu = cpu_seconds(servers.relay_pid) - cpu
    failed = [r for r in results if isinstance(r, BaseException)]
    bodies = [body for r in results if not isinstance(r, BaseException) for body in (r[1],)]
    exact = [len(body) == frames * FRAME_BYTES for body in bodies]
    # The tone decoded and compared sample by sample: a lost, repeated or reordered chunk shows.
    tone_ok = [ok and int(np.abs(np.frombuffer(body, "<i2").astype(np.int32) - expected).max()) <= 2 for ok, body in zip(exact, bodies)]
    ttfb = [r[0] for r in results if not isinstance(r, BaseException)]
    return {
        "streams": streams,
        "frames_each": frames,
        "audio_seconds_each": frames * FRAME_SAMPLES / RATE,
        "completed": len(bodies),
        "failed": [repr(f)[:200] for f in failed[:5]],
        "exact_length": sum(exact),
        "tone_intact": sum(tone_ok),
        "bytes_received": sum(len(b) for b in bodies),
        "bytes_expected": streams * frames * FRAME_BYTES,
        "wall_seconds": wall,
        "relay_cpu_seconds": cpu,
        "first_byte": summary(ttfb) if ttfb else None,
        "relay_rss_peak_mib": max(rss.samples) / 1024,
        "relay_rss_samples": len(rss.samples),
    }


async def load(servers: Servers, streams: int, frames: int, rounds: int = 2) -> dict:
    sampler = RssSampler(servers.relay_pid)
    result: dict = {"relay_rss_idle_mib": sampler.rss_kib() / 1024, "rounds": []}
    for _ in range(rounds):
        round_result = await load_round(servers, streams, frames)
        await asyncio.sleep(2)  # let connections close and the relay settle
        round_result["relay_rss_after_mib"] = sampler.rss_kib() / 1024
        result["rounds"].append(round_result)
        print(
            f"  {streams} streams x {frames} frames: {round_result['completed']} complete, "
            f"{round_result['exact_length']} exact, {round_result['tone_intact']} tone intact, "
            f"relay RSS peak {round_result['relay_rss_peak_mib']:.1f} MiB, after {round_result['relay_rss_after_mib']:.1f} MiB",
            flush=True,
        )
    first, last = result["rounds"][0], result["rounds"][-1]
    result["no_loss"] = all(r["completed"] == r["exact_length"] == r["tone_intact"] == streams for r in result["rounds"])
    # Bounded: another round of the same load takes no more memory than the first did (2 MiB of
    # slack for the allocator's moods).
    result["bounded"] = last["relay_rss_peak_mib"] <= first["relay_rss_peak_mib"] + 2
    return result


# --- report ----------------------------------------------------------------------------------


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
    }


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} physical cores), "
        f"{m['memory_gib']} GiB, Python {m['python']}. Relay, node, direct server and client share it.",
        "",
        f"Time to first byte, input of {result['settings']['text_frames']} frames, response_format pcm:",
        "",
        "| streams at once | requests | direct p50 | direct p99 | through relay p50 | through relay p99 | "
        "relay adds p50 | relay adds p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in result["ttfb"]:
        d, r = level["direct"], level["relay"]
        lines.append(
            f"| {level['streams']} | {level['requests']} | {d['p50_ms']:.1f} ms | {d['p99_ms']:.1f} ms | "
            f"{r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {level['added_p50_ms']:+.1f} ms | {level['added_p99_ms']:+.1f} ms |"
        )
    if result.get("load"):
        load_result = result["load"]
        rounds = load_result["rounds"]
        lines += [
            "",
            f"{rounds[0]['streams']} streams at once through the relay, {rounds[0]['audio_seconds_each']:.1f} s of "
            f"audio each, {len(rounds)} rounds:",
            "",
            "| round | complete | exact bytes | tone intact | wall | relay CPU | first byte p50 / p99 | relay RSS peak | relay RSS after |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(rounds, 1):
            fb = r["first_byte"] or {"p50_ms": float("nan"), "p99_ms": float("nan")}
            lines.append(
                f"| {i} | {r['completed']}/{r['streams']} | {r['exact_length']} | {r['tone_intact']} | "
                f"{r['wall_seconds']:.1f} s | {r['relay_cpu_seconds']:.1f} s | {fb['p50_ms']:.0f} / {fb['p99_ms']:.0f} ms | "
                f"{r['relay_rss_peak_mib']:.1f} MiB | {r['relay_rss_after_mib']:.1f} MiB |"
            )
        lines += [
            "",
            f"Relay RSS idle (node connected, before the load): {load_result['relay_rss_idle_mib']:.1f} MiB. "
            f"No loss: {'yes' if load_result['no_loss'] else 'NO'}. "
            f"Bounded (round 2 peak <= round 1 peak + 2 MiB): {'yes' if load_result['bounded'] else 'NO'}.",
        ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict:
    result: dict = {
        "machine": machine(),
        "command": " ".join(["./bench.sh tunnel", *sys.argv[1:]]),
        "settings": {
            "requests_per_level": args.requests,
            "levels": args.levels,
            "text_frames": len(args.text),
            "load_streams": args.load_streams,
            "load_frames": args.load_frames,
            "max_batch": args.max_batch,
            "max_queue": args.max_queue,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as workdir:
        servers = Servers(Path(workdir), args.max_batch, args.max_queue)
        try:
            for url in (servers.direct_url, servers.relay_url):  # warm both paths up
                async with client_for(10) as client:
                    await closed_loop(client, url, min(10, max(args.levels)), 20, args.text)
            result["ttfb"] = []
            for streams in args.levels:
                level = await ttfb_level(servers, streams, args.requests, args.text)
                result["ttfb"].append(level)
                print(
                    f"  {streams} at once: direct p50 {level['direct']['p50_ms']:.1f} ms, relay p50 "
                    f"{level['relay']['p50_ms']:.1f} ms (adds {level['added_p50_ms']:+.1f} ms p50, "
                    f"{level['added_p99_ms']:+.1f} ms p99)",
                    flush=True,
                )
            if args.load_streams:
                result["load"] = await load(servers, args.load_streams, args.load_frames)
            result["relay_log_errors"] = [line for line in servers.relay_log().splitlines() if " ERROR " in line][:10]
        finally:
            servers.close()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./bench.sh tunnel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level and server (200)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 10, 50], help="streams at once (1 10 50)")
    parser.add_argument("--text", default="Hello", help="input of the time-to-first-byte requests: a frame (80 ms) per character")
    parser.add_argument("--load-streams", type=int, default=100, help="concurrent streams in the load rounds (100; 0: skip)")
    parser.add_argument("--load-frames", type=int, default=50, help="frames per load stream (50: 4 s of audio)")
    parser.add_argument("--max-batch", type=int, default=128, help="the synthetic model's max_batch: streams at once")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--serve-direct", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the direct server's subprocess
    parser.add_argument("--output", type=Path, default=RESULTS / "tunnel.json")
    args = parser.parse_args(argv)
    if args.serve_direct:
        serve_direct(args.serve_direct, args.max_batch, args.max_queue)
        return
    if args.max_batch < max([*args.levels, args.load_streams]):
        parser.error("--max-batch must cover the most streams asked at once, or some would queue")
    result = asyncio.run(run(args))
    print()
    print(report(result))
    if result["relay_log_errors"]:
        print("\nrelay log errors:\n" + "\n".join(result["relay_log_errors"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
