"""Model speed on this machine: the official qwen-tts call against our streaming path, in one run.

    ./bench.sh                       # both sizes
    ./bench.sh --models 0.6B         # options: --frames N, --repeats N, --streams 1 2 4, --no-int8

Random weights of the real 0.6B and 1.7B CustomVoice shapes (built from the released configs kept
in ``local_node/testing/qwen_files``, cached in ``.cache/bench``), bfloat16, all cores. Per size:

  official  ``Qwen3TTSModel.generate_custom_voice`` on the model as qwen-tts loads it: HF generate
            for the talker and, inside every talker step, for the code predictor; the codec
            decodes the whole utterance at the end.
  ours      ``generate_frames`` + ``StreamingDecoder`` in this process, on a second copy of the
            model prepared as the node prepares it (``packing.prepare_for_generation``). Its
            decoding runs on a thread of its own, beside generation; what it adds to the time
            per frame is measured against the same runs without decoding.
  batched   the same through a ``FrameBatch`` of 1, 2 and 4 utterances (continuous batching),
            ms per step: a frame for every row, each row's codec decoding included.
  int8      ours with ``weights: int8`` (local_node/model/int8.py).
  drift     how far ours (bf16, int8) moves the logits from qwen-tts' numbers: KL divergence per
            frame and top-1 agreement, teacher-forced on greedy codes, against the model prepared
            with PyTorch's kernels (``portable``: oneDNN's products, which qwen-tts' own forward
            runs; the tests find no difference between the two on tiny checkpoints).
  roofline  the machine's streaming read bandwidth, measured in the same run (one core, all
            cores), and each configuration's bytes read per frame (every talker weight once, the
            code predictor's 16 times): the floor is bytes / bandwidth, and efficiency is the floor
            over the measured ms/frame without decoding.
  served    a real relay and node (subprocesses on loopback) and the openai SDK streaming
            ``response_format="pcm"``: what a client sees, tunnel included; then 1, 2 and 4
            streams at once (``max_batch`` 4) for aggregate throughput, with bf16 weights and with
            int8 weights. Node start-up and resident memory for each. Once more with
            ``text_input: streaming`` (the text fed a token per frame: a short prompt to
            prefill), for time to first audio.

Both in-process paths sample with the checkpoint's defaults for the same number of frames (random
weights almost never say EOS; a run that does is timed per frame all the same) and decode with
the codec in the same dtype, the one the node picks for this CPU (``codec_dtype: auto``). Each
in-process figure is the best of ``--repeats`` runs, interleaved, so a busy spell of the machine
hits both. Prints a table, writes ``bench/results/speed.json`` and ``bench/results/speed.png``
(ms per frame per configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from local_node.kernels import tiers

tiers.cap_vendor_libraries()  # QWEN3_TTS_ISA caps oneDNN and ATen too, for both paths: before torch loads

import torch  # noqa: E402

from local_node.__main__ import physical_cores, use_product_cores  # noqa: E402
from local_node.engine.qwen import resolve_codec_dtype  # noqa: E402
from local_node.kernels import cpu_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
RESULTS = ROOT / "bench" / "results"
TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
SPEAKER = "ryan"
FRAME_SECONDS = 0.08
# Both paths decode with the codec in the dtype the node picks for this CPU (codec_dtype: auto).
CODEC_DTYPE = resolve_codec_dtype("auto")
# Torch threads for each of our model's two threads, as the node picks them (threads: auto). The
# official call runs on the main thread with torch's default, one per core.
NODE_THREADS = max(1, physical_cores() // 2)


@dataclass
class Run:
    """One way of producing one utterance, timed."""

    frames: int
    seconds: float  # request to last audio
    first_audio: float  # request to first audio (the whole run when not streamed)
    decode_seconds: float = 0.0  # codec decoding, on its own thread for ours (in-process runs)
    decode_added: float | None = None  # seconds decoding added: this run's time less a run without it

    @property
    def ms_per_frame(self) -> float:
        return 1000 * self.seconds / self.frames

    @property
    def rtf(self) -> float:
        return self.seconds / (self.frames * FRAME_SECONDS)


@dataclass
class SizeResult:
    model: str
    weights_gb: float
    load_seconds: float
    official: Run
    ours: Run
    int8: Run | None = None
    ours_bare: Run | None = None  # ours without decoding: what the roofline bounds
    int8_bare: Run | None = None
    bytes_per_frame: dict = field(default_factory=dict)  # weights -> bytes read per frame
    drift: dict = field(default_factory=dict)  # weights -> part -> KL and agreement against qwen-tts' numbers
    batch_scaling: dict = field(default_factory=dict)  # weights -> utterances at once -> frames/s
    served: Run | None = None  # bf16 weights, one stream
    served_streaming_text: Run | None = None  # the same with text_input: streaming
    nodes: dict[str, dict] = field(default_factory=dict)  # weights -> start-up, RSS, streams (n -> aggregate figures)


# --- in process -----------------------------------------------------------------------------


def official_run(tts, frames: int) -> Run:
    """qwen-tts as documented; its codec decode is timed apart by wrapping it."""
    tokenizer = tts.model.speech_tokenizer
    decode, spent = tokenizer.decode, [0.0]

    def timed_decode(*args, **kwargs):
        started = time.perf_counter()
        try:
            return decode(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    tokenizer.decode = timed_decode
    try:
        started = time.perf_counter()
        wavs, rate = tts.generate_custom_voice(text=TEXT, speaker=SPEAKER, language="English", max_new_tokens=frames + 1)
        seconds = time.perf_counter() - started
    finally:
        del tokenizer.decode  # back to the class's method
    n = round(len(wavs[0]) / (rate * FRAME_SECONDS))
    return Run(n, seconds, seconds, spent[0])


class Ours:
    """Our path as the node runs it, minus the tunnel: the model's Batcher (a generation thread
    and a decoding thread, ``threads`` torch threads each) and a StreamingDecoder per utterance."""

    def __init__(self, tts, schedule: tuple[int, ...], rows: int = 4) -> None:
        from local_node.engine.batcher import Batcher

        self.tts, self.schedule = tts, schedule
        self.batcher = Batcher(tts.model, rows=rows, name="bench", threads=NODE_THREADS)

    def run(self, frames: int, decode: bool = True) -> Run:
        """One utterance; ``decode`` False leaves the frames undecoded, to see what decoding adds."""
        from local_node.model.codec_stream import StreamingDecoder
        from local_node.model.generation import SamplingConfig, prepare_prompt

        started = time.perf_counter()
        prompt = prepare_prompt(self.tts, kind="custom_voice", text=TEXT, language="English", speaker=SPEAKER)
        decoder = StreamingDecoder(self.tts.model.speech_tokenizer, self.schedule)
        decoding, count = [0.0], [0]

        def timed(call):
            def run(*args):
                t = time.perf_counter()
                try:
                    return call(*args)
                finally:
                    decoding[0] += time.perf_counter() - t

            return run

        def push(codes):
            count[0] += 1
            return timed(decoder.push)(codes) if decode else None

        sampling = SamplingConfig.from_tts(self.tts, max_new_tokens=frames + 1)
        first = None
        for _ in self.batcher.run(prompt, sampling, threading.Event(), push, timed(decoder.flush) if decode else lambda: None):
            first = first if first is not None else time.perf_counter() - started
        seconds = time.perf_counter() - started
        return Run(count[0], seconds, first if first is not None else seconds, decoding[0])

    def best_of(self, frames: int, repeats: int) -> tuple[Run, Run]:
        """The best of ``repeats`` runs, with what decoding added (less the best of as many runs
        without decoding, interleaved with them), and that best run without decoding."""
        runs, bare = zip(*[(self.run(frames), self.run(frames, decode=False)) for _ in range(repeats)])
        return with_decode_added(list(runs), list(bare)), best(list(bare))

    def concurrent(self, frames: int, n: int) -> float:
        """Frames per second, all told, with ``n`` utterances generated together."""
        runs, wall = together(lambda: self.run(frames), n)
        return sum(r.frames for r in runs) / wall


@torch.inference_mode()
def teacher_forced_logprobs(model, prompt, frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of codebook 0 per frame [F, V] and of codebooks 1-15 [F * 15, V'] when
    ``model`` is fed the given frames' codes: generate_frames' steps with the codes imposed."""
    from local_node.model.decoder_stack import DecoderStack

    talker = model.talker
    predictor = talker.code_predictor
    stack = DecoderStack(talker.model, capacity=prompt.inputs_embeds.shape[1] + len(frames))
    small = DecoderStack(predictor.model, capacity=talker.config.num_code_groups + 1)
    inputs, talker_lp, predictor_lp = prompt.inputs_embeds, [], []
    for k, codes in enumerate(frames):
        hidden = stack.forward(inputs)[:, -1:]
        talker_lp.append(talker.codec_head(hidden)[:, -1].float().log_softmax(-1))
        embeds = [talker.model.codec_embedding(codes[None, :1])]
        small.reset()  # a fresh sequence per frame, as FrameBatch does
        small.forward(predictor.small_to_mtp_projection(hidden))
        for group in range(talker.config.num_code_groups - 1):
            out = small.forward(predictor.small_to_mtp_projection(embeds[-1]))
            predictor_lp.append(predictor.lm_head[group](out[:, -1]).float().log_softmax(-1))
            embeds.append(predictor.model.codec_embedding[group](codes[None, group + 1 : group + 2]))
        text = prompt.trailing_text[:, k : k + 1] if k < prompt.trailing_text.shape[1] else prompt.tts_pad
        inputs = torch.cat(embeds, dim=1).sum(1, keepdim=True) + text
    return torch.cat(talker_lp), torch.cat(predictor_lp)


def drift(reference, tts, frames: int) -> dict:
    """KL(reference || tts) per frame, and how often the most likely code is the same, on the
    reference model's greedy codes."""
    from local_node.model.generation import SamplingConfig, generate_frames, prepare_prompt

    prompt = prepare_prompt(reference, kind="custom_voice", text=TEXT, language="English", speaker=SPEAKER)
    greedy = SamplingConfig.from_tts(reference, max_new_tokens=frames + 1, do_sample=False, subtalker_dosample=False)
    codes = list(generate_frames(reference.model, prompt, greedy))
    result = {}
    for name, ref, got in zip(
        ("talker", "code_predictor"),
        teacher_forced_logprobs(reference.model, prompt, codes),
        teacher_forced_logprobs(tts.model, prompt, codes),
    ):
        ref, got = ref.double(), got.double()
        kl = (ref.exp() * (ref - got)).sum(-1)
        result[name] = {
            "kl_mean": kl.mean().item(),
            "kl_max": kl.max().item(),
            "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        }
    return result


def bytes_per_frame(model) -> int:
    """Weight bytes one frame reads at batch 1: the talker's once, the code predictor's decoder
    layers and input projection 16 times (a position for the talker's hidden state, then one per
    code), each of its 15 heads once."""
    talker = model.talker
    predictor = talker.code_predictor

    def linears(module) -> int:  # the products' weights (and int8 scales); embeddings are looked up, not read whole
        return sum(
            m.weight.nbytes + (m.scale.nbytes if isinstance(getattr(m, "scale", None), torch.Tensor) else 0)
            for m in module.modules()
            if hasattr(m, "in_features") and isinstance(getattr(m, "weight", None), torch.Tensor)
        )

    once = linears(talker.model) + linears(talker.codec_head)
    per_position = linears(predictor.model) + linears(predictor.small_to_mtp_projection)
    return once + 16 * per_position + linears(predictor.lm_head)


def read_bandwidth() -> dict[str, float]:
    """Streaming read bandwidth, GB/s, on one core and on all physical cores: the best of 5 reads
    of 2 GiB (well past any cache)."""
    kernels = next((k for k in map(cpu_kernels.kernels, cpu_kernels.machine_tiers()) if k is not None), None)
    if kernels is None:
        return {}
    measured = kernels.read_bandwidth(sorted({1, physical_cores()}))
    return {f"{n} core{'s' * (n > 1)}": gb_per_second for n, gb_per_second in measured.items()}


def batch_scaling(ours: Ours, frames: int, rows: tuple[int, ...] = (1, 2, 4)) -> dict[int, float]:
    """Frames per second, all told, with 1, 2 and 4 utterances generated together (continuous
    batching), decoding included, as the node's batcher runs them."""
    return {n: ours.concurrent(frames, n) for n in rows}


def together(run: Callable[[], Run], n: int) -> tuple[list[Run], float]:
    """``n`` runs at once, each on its own thread: their results and the wall time of all."""
    runs: list[Run] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda: runs.append(run())) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs, time.perf_counter() - started


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.ms_per_frame)


def with_decode_added(runs: list[Run], bare: list[Run]) -> Run:
    """The best of ``runs``, and what decoding added to it: its time per frame less that of the
    best of ``bare``, the same runs without decoding. Ours decodes on a thread of its own, so
    its decoding time is not all on the frames' path."""
    run, without = best(runs), best(bare)
    run.decode_added = max(0.0, run.seconds - without.ms_per_frame * run.frames / 1000)
    return run


# --- through relay and tunnel ---------------------------------------------------------------


class Served:
    """A relay and one node serving ``folder`` as ``model``, as subprocesses on loopback."""

    API_KEY, NODE_TOKEN = "sk-bench-0123456789abcdef", "node-bench-0123456789abcdef"

    def __init__(self, folder: Path, frames: int, schedule: tuple[int, ...], weights: str, text_input: str, workdir: Path) -> None:
        import yaml

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "RELAY_API_KEYS": f"bench:{self.API_KEY}",
            "RELAY_NODE_TOKENS": f"bench:{self.NODE_TOKEN}",
            "BENCH_NODE_TOKEN": self.NODE_TOKEN,
        }
        config = {
            "relay": {"url": f"ws://127.0.0.1:{port}/v1/tunnel", "token_env": "BENCH_NODE_TOKEN", "node_name": "bench"},
            "dtype": "bfloat16",
            "threads": "auto",
            "models": {
                "bench": {
                    "source": str(folder),
                    "max_new_frames": frames,
                    "max_batch": 4,
                    "max_queue": 8,
                    "chunk_frames": list(schedule),
                    "weights": weights,
                    "text_input": text_input,
                }
            },
        }
        (workdir / "node.yaml").write_text(yaml.safe_dump(config))
        self.logs = [open(workdir / "relay.log", "wb"), open(workdir / "node.log", "wb")]
        self.relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=self.logs[0],
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self._wait(lambda: self._get("/health") == 200, "relay start", 30)
        started = time.perf_counter()
        self.node = subprocess.Popen(
            [sys.executable, "-m", "local_node", "--config", str(workdir / "node.yaml")],
            env=env,
            stdout=self.logs[1],
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self._wait(lambda: "bench" in self._models(), "the node's model", 1800, workdir / "node.log")
        self.startup_seconds = time.perf_counter() - started  # process start, imports, load, warm-up

    def rss_gb(self) -> dict[str, float]:
        """The node's resident memory: all of it, and the part that is its own (not pages of
        memory-mapped checkpoint files, which the kernel can drop and re-read)."""
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.node.pid}/status").read_text().splitlines() if ":" in line)
        return {"rss": int(status["VmRSS"].split()[0]) / 2**20, "anon": int(status["RssAnon"].split()[0]) / 2**20}

    def speak(self, client) -> Run:
        started = time.perf_counter()
        first, size = None, 0
        with client.audio.speech.with_streaming_response.create(
            model="bench", voice=SPEAKER, input=TEXT, response_format="pcm"
        ) as response:
            for chunk in response.iter_bytes():
                if chunk and first is None:
                    first = time.perf_counter() - started
                size += len(chunk)
        seconds = time.perf_counter() - started
        return Run(round(size / 2 / (24000 * FRAME_SECONDS)), seconds, first or seconds)

    def concurrent(self, client, n: int) -> dict:
        runs, wall = together(lambda: self.speak(client), n)
        audio = sum(r.frames for r in runs) * FRAME_SECONDS
        firsts = sorted(r.first_audio for r in runs)
        return {
            "streams": n,
            "audio_seconds_per_second": audio / wall,
            "wall_seconds": wall,
            "first_audio_min": firsts[0],
            "first_audio_max": firsts[-1],
        }

    def close(self) -> None:
        for proc in (self.node, self.relay):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs:
            log.close()

    def _get(self, path: str) -> int | None:
        import httpx

        try:
            return httpx.get(self.url + path, headers={"Authorization": f"Bearer {self.API_KEY}"}, timeout=2).status_code
        except httpx.HTTPError:
            return None

    def _models(self) -> set[str]:
        import httpx

        try:
            response = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {self.API_KEY}"}, timeout=2)
            return {m["id"] for m in response.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return set()

    def _wait(self, ready, what: str, timeout: float, log: Path | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc in (self.relay, getattr(self, "node", None)):
                if proc is not None and proc.poll() is not None:
                    raise SystemExit(f"waiting for {what}: a process exited\n{log.read_text()[-3000:] if log else ''}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one model size -------------------------------------------------------------------------


def bench_size(size: str, args: argparse.Namespace) -> SizeResult:
    from local_node.config import ModelConfig
    from local_node.model.packing import prepare_for_generation
    from local_node.model.qwen_import import import_qwen_tts
    from local_node.testing.tiny_model import write_random_checkpoint

    model = f"{size}-CustomVoice"
    folder = CACHE / model
    if not (folder / "model.safetensors").exists():
        print(f"  writing a random {model} checkpoint to {folder} (once)", flush=True)
        write_random_checkpoint(folder, model, tiny=False)
    weights_gb = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e9
    schedule = ModelConfig.chunk_frames if args.schedule is None else tuple(args.schedule)

    def load(weights: str = "official", tier: str | None = None):
        tts = import_qwen_tts().Qwen3TTSModel.from_pretrained(str(folder), dtype=torch.bfloat16)
        tts.model.speech_tokenizer.model.to(CODEC_DTYPE)
        if weights != "official":  # as the node prepares it
            prepare_for_generation(tts.model, int8=weights == "int8", tier=tier)
        return tts

    started = time.perf_counter()
    official = load()
    load_seconds = time.perf_counter() - started
    tts = load("bf16")  # ours: a second copy, prepared; qwen-tts' own call runs on the untouched one
    ours_path = Ours(tts, schedule)

    warm = min(args.frames, 4)
    official_run(official, warm), ours_path.run(warm)  # page the weights in, set kernels up
    officials, ours, bare = [], [], []
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits all
        officials.append(official_run(official, args.frames))
        ours.append(ours_path.run(args.frames))
        bare.append(ours_path.run(args.frames, decode=False))
        print(
            f"  official {officials[-1].ms_per_frame:.0f} ms/frame, ours {ours[-1].ms_per_frame:.0f} ms/frame "
            f"({bare[-1].ms_per_frame:.0f} without decoding)",
            flush=True,
        )
    del official
    result = SizeResult(model, weights_gb, load_seconds, best(officials), with_decode_added(ours, bare))
    result.ours_bare, result.bytes_per_frame["bf16"] = best(bare), bytes_per_frame(tts.model)
    result.batch_scaling["bf16"] = batch_scaling(ours_path, args.frames)
    print(f"  frames/s by utterances at once: {result.batch_scaling['bf16']}", flush=True)
    reference = load("bf16", tier="portable")  # qwen-tts' numbers (oneDNN's products), for the drift
    result.drift["bf16"] = drift(reference, tts, min(args.frames, 20))
    print(f"  drift from qwen-tts' numbers: {result.drift['bf16']}", flush=True)
    del ours_path, tts

    if args.int8:
        quantized = Ours(load("int8"), schedule)
        quantized.run(warm)
        result.int8, result.int8_bare = quantized.best_of(args.frames, args.repeats)
        result.bytes_per_frame["int8"] = bytes_per_frame(quantized.tts.model)
        result.batch_scaling["int8"] = batch_scaling(quantized, args.frames)
        result.drift["int8"] = drift(reference, quantized.tts, min(args.frames, 20))
        print(
            f"  int8 {result.int8.ms_per_frame:.0f} ms/frame, drift {result.drift['int8']}, "
            f"frames/s by utterances at once {result.batch_scaling['int8']}",
            flush=True,
        )
        del quantized
    del reference

    if args.streams:
        from openai import OpenAI

        nodes = [("dtype", "auto"), ("dtype", "streaming")] + ([("int8", "auto")] if args.int8 else [])
        for weights, text_input in nodes:
            with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
                served = Served(folder, args.frames, schedule, weights, text_input, Path(workdir))
                try:
                    client = OpenAI(base_url=served.url + "/v1", api_key=served.API_KEY, timeout=1800)
                    if text_input == "streaming":
                        result.served_streaming_text = best([served.speak(client) for _ in range(args.repeats)])
                        continue
                    if weights == "dtype":
                        result.served = best([served.speak(client) for _ in range(args.repeats)])
                    node = result.nodes[weights] = {"startup_seconds": served.startup_seconds, "rss_gb": served.rss_gb(), "streams": {}}
                    for n in args.streams:
                        node["streams"][n] = served.concurrent(client, n)
                        rate = node["streams"][n]["audio_seconds_per_second"]
                        print(f"  {'bf16' if weights == 'dtype' else weights} weights, {n} stream(s): {rate:.2f} audio s/s", flush=True)
                finally:
                    served.close()
    return result


# --- report ---------------------------------------------------------------------------------


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = ", native bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else ", no native bf16"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores ({simd}{bf16}), {memory:.0f} GiB, torch {torch.__version__}, {torch.get_num_threads()} threads"


def report(results: list[SizeResult], bandwidth: dict[str, float]) -> str:
    lines = [
        "| model | path | ms/frame | decoding: added per frame | decoding: its thread's time per frame | RTF | first audio | vs official |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = r.official.ms_per_frame
        for name, run in (
            ("official qwen-tts", r.official),
            ("ours, in process", r.ours),
            ("ours, served (relay + tunnel)", r.served),
            ("ours, served, text_input: streaming", r.served_streaming_text),
            ("ours, int8 weights, in process", r.int8),
        ):
            if run is None:
                continue
            added = run.decode_seconds if run is r.official else run.decode_added  # the official call decodes after generating
            decode = "-" if added is None else f"{1000 * added / run.frames:.0f} ({100 * added / run.seconds:.0f} %)"
            thread = f"{1000 * run.decode_seconds / run.frames:.0f}" if run.decode_seconds else "-"
            lines.append(
                f"| {r.model} | {name} | {run.ms_per_frame:.0f} | {decode} | {thread} | {run.rtf:.2f} | "
                f"{run.first_audio:.2f} s | {base / run.ms_per_frame:.2f}x |"
            )
    lines += [
        "",
        "| model | weights | load (in process) | node start-up (load + warm-up) | node RSS (own) | "
        "streams at once: audio s per s (first audio, first-last stream) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        for weights, node in r.nodes.items():
            streams = ", ".join(
                f"{n}: {s['audio_seconds_per_second']:.2f} ({s['first_audio_min']:.1f}-{s['first_audio_max']:.1f} s)"
                for n, s in node["streams"].items()
            )
            name = "bf16" if weights == "dtype" else weights
            lines.append(
                f"| {r.model} | {name} ({r.weights_gb:.2f} GB on disk) | {r.load_seconds:.1f} s | "
                f"{node['startup_seconds']:.1f} s | {node['rss_gb']['rss']:.2f} GiB ({node['rss_gb']['anon']:.2f}) | {streams} |"
            )
    lines += [
        "",
        "| model | weights | in process, frames/s all told (decoding included): 1 utterance | 2 at once | 4 at once | 4 vs 1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for weights, fps in r.batch_scaling.items():
            lines.append(f"| {r.model} | {weights} | {fps[1]:.1f} | {fps[2]:.1f} | {fps[4]:.1f} | {fps[4] / fps[1]:.2f}x |")
    drifts = [(r.model, weights, part, d) for r in results for weights, parts in r.drift.items() for part, d in parts.items()]
    if drifts:
        lines += [
            "",
            "| model | weights | logits vs qwen-tts' numbers | KL mean | KL max | same top code |",
            "|---|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {m} | {w} | {part} | {d['kl_mean']:.2e} | {d['kl_max']:.2e} | {100 * d['top1_agreement']:.0f} % |"
            for m, w, part, d in drifts
        ]
    if bandwidth:
        full = max(bandwidth.values())
        lines += [
            "",
            "read bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items()),
            "",
            "| model | weights | bytes read per frame | floor (at all cores' bandwidth) | ms/frame without decoding | efficiency | "
            "with decoding | vs official |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results:
            for weights, bare, run in (("bf16", r.ours_bare, r.ours), ("int8", r.int8_bare, r.int8)):
                if bare is None or weights not in r.bytes_per_frame:
                    continue
                floor = r.bytes_per_frame[weights] / full / 1e6  # ms
                lines.append(
                    f"| {r.model} | {weights} | {r.bytes_per_frame[weights] / 1e9:.2f} GB | {floor:.0f} ms | "
                    f"{bare.ms_per_frame:.0f} | {100 * floor / bare.ms_per_frame:.0f} % | {run.ms_per_frame:.0f} | "
                    f"{r.official.ms_per_frame / run.ms_per_frame:.2f}x |"
                )
    return "\n".join(lines)


def plot(results: list[SizeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colours = [], [], []
    for r in results:
        for name, run, colour in (
            ("official", r.official, "#999999"),
            ("ours", r.ours, "#1f77b4"),
            ("served", r.served, "#2ca02c"),
            ("int8", r.int8, "#ff7f0e"),
        ):
            if run is not None:
                labels.append(f"{r.model.split('-')[0]}\n{name}")
                values.append(run.ms_per_frame)
                colours.append(colour)
    fig, ax = plt.subplots(figsize=(1.3 * len(values) + 2, 4))
    bars = ax.bar(labels, values, color=colours)
    ax.bar_label(bars, fmt="%.0f")
    ax.axhline(1000 * FRAME_SECONDS, color="red", linestyle="--", linewidth=1, label="real time (80 ms of audio per frame)")
    ax.set_ylabel("ms per 80 ms frame (incl. decoding)")
    ax.set_title("Qwen3-TTS 12 Hz CustomVoice, bf16, random weights of the real shape")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./bench.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["0.6B", "1.7B"], choices=["0.6B", "1.7B"])
    parser.add_argument("--frames", type=int, default=40, help="frames per utterance (40 = 3.2 s of audio)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per in-process path; the best counts")
    parser.add_argument("--streams", type=int, nargs="*", default=[1, 2, 4], help="concurrent streams through the relay; none to skip")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 run")
    parser.add_argument("--schedule", type=int, nargs="+", help="chunk_frames for our path (default: the node's)")
    args = parser.parse_args(argv)

    use_product_cores(NODE_THREADS)  # as the node does
    print(f"machine: {machine()}", flush=True)
    kernels, why = cpu_kernels.choice()
    print(
        f"kernels: {cpu_kernels.active_tier()} ({why}); "
        + ", ".join(f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if name in os.environ),
        flush=True,
    )
    bandwidth = read_bandwidth()
    measured = ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items())
    print(f"read bandwidth: {measured or 'not measured (no kernels build here)'}", flush=True)
    results = []
    for size in args.models:
        print(f"{size}:", flush=True)
        results.append(bench_size(size, args))
    table = report(results, bandwidth)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "speed" if tiers.requested() == "native" else f"speed-{tiers.requested()}"  # an emulated CPU's apart
    (RESULTS / f"{name}.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "kernels": cpu_kernels.active_tier(),
                "read_bandwidth_gb_s": bandwidth,
                "args": vars(args),
                "peak_rss_gb_bench_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    plot(results, RESULTS / f"{name}.png")
    print(f"\nwrote {RESULTS / f'{name}.json'} and {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
