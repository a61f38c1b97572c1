"""Live text on this machine: how soon speech starts while the text is still being written.

A real relay and node serve random weights of the real 0.6B CustomVoice shape (``.cache/bench``,
written once, as ``./bench.sh`` does). A client writes an answer word by word at an LLM's pace
over ``/v1/audio/speech/stream`` and measures, from its first word:

* ``continuous``: first audio (speech begins while the text is written), and when the last
  word was sent;
* ``none``: first audio when the whole answer is spoken after ``input.done``, as a client of a
  plain speech API would (the baseline, measured in the same run);
* both with 1 and 2 sessions at once (one model, batched).

Random weights never end an utterance, so each is capped at ``--frames`` frames; what is measured
is when speech starts, not how it sounds. ``./bench.sh live``; writes ``bench/results/live.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from bench.speed import CACHE, RESULTS, SPEAKER, Served, machine
from local_node.model.qwen_import import import_qwen_tts

ANSWER = (
    "Sure. The quickest way to get there is to take the number twelve bus from the station, "
    "get off at the market, and walk two blocks north. It takes about twenty minutes in all."
)


async def session(url: str, key: str, mode: str, words_per_second: float) -> dict:
    """One answer, written at ``words_per_second``; seconds from the first word."""
    config = {"type": "session.config", "model": "bench", "voice": SPEAKER, "response_format": "pcm", "split_granularity": mode}
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None) as ws:
        await ws.send(json.dumps(config))
        started = time.perf_counter()
        times: dict = {}

        async def write() -> None:
            for word in ANSWER.split(" "):
                await ws.send(json.dumps({"type": "input.text", "text": word + " "}))
                await asyncio.sleep(1 / words_per_second)
            times["text_done"] = time.perf_counter() - started
            await ws.send(json.dumps({"type": "input.done"}))

        writing = asyncio.ensure_future(write())
        audio = 0
        async for message in ws:
            if isinstance(message, bytes):
                times.setdefault("first_audio", time.perf_counter() - started)
                audio += len(message)
            elif json.loads(message)["type"] == "session.done":
                break
        await writing
        times["audio_seconds"] = audio / 2 / 24000
        return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./bench.sh live", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=50, help="codec frames per utterance (default 50: 4 s)")
    parser.add_argument("--words-per-second", type=float, default=5.0, help="the writer's pace (default 5: an LLM at ~7 tokens/s)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    folder = CACHE / "0.6B-CustomVoice"
    if not (folder / "model.safetensors").exists():
        from local_node.testing.tiny_model import write_random_checkpoint

        print(f"writing a random 0.6B-CustomVoice checkpoint to {folder} (once)", flush=True)
        import_qwen_tts()
        write_random_checkpoint(folder, "0.6B-CustomVoice", tiny=False)
    with tempfile.TemporaryDirectory() as work:
        served = Served(folder, args.frames, (1, 4, 8, 16), "dtype", "auto", Path(work))
        try:
            url = served.url.replace("http://", "ws://") + "/v1/audio/speech/stream"
            results: dict = {"machine": machine(), "words_per_second": args.words_per_second, "frames": args.frames}
            for mode in ("continuous", "none"):
                for streams in (1, 2):
                    runs = []
                    for _ in range(args.repeats):
                        runs += asyncio.run(_together(url, served.API_KEY, mode, args.words_per_second, streams))
                    results[f"{mode}, {streams} at once"] = {
                        "first_audio": statistics.median(r["first_audio"] for r in runs),
                        "text_done": statistics.median(r["text_done"] for r in runs),
                    }
                    print(mode, streams, results[f"{mode}, {streams} at once"], flush=True)
        finally:
            served.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "live.json").write_text(json.dumps(results, indent=1))
    print(report(results))


async def _together(url: str, key: str, mode: str, pace: float, n: int) -> list[dict]:
    return list(await asyncio.gather(*(session(url, key, mode, pace) for _ in range(n))))


def report(results: dict) -> str:
    lines = [
        f"Live text, {results['machine']}; an answer of {len(ANSWER.split())} words written at "
        f"{results['words_per_second']:g} words/s; seconds from its first word (median):",
        "",
        "| sessions at once | continuous: first audio | none (after input.done): first audio | last word sent |",
        "|---|---|---|---|",
    ]
    for n in (1, 2):
        live, whole = results[f"continuous, {n} at once"], results[f"none, {n} at once"]
        lines.append(f"| {n} | {live['first_audio']:.2f} | {whole['first_audio']:.2f} | {live['text_done']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
