"""``python -m local_node``: run the home node; ``python -m local_node tiny-model``: write a test checkpoint."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tunnel.credentials import RedactCredentials

try:
    from local_node.config import ConfigError, NodeConfig, config_path, load_config
    from local_node.kernels.tiers import TierError, cap_vendor_libraries, requested
    from local_node.serving.metrics import MetricsListener, NodeMetrics
    from local_node.serving.worker import ModelWorker
except ImportError as missing:  # a relay-only install (`pip install .`) has no node dependencies
    sys.exit(f"local_node: {missing.name} is not installed; the node needs its extra: pip install 'qwen3-tts-relay[node]'")

if TYPE_CHECKING:
    from local_node.serving.voices import VoiceKeeper

log = logging.getLogger("local_node")


def physical_cores() -> int:
    """Cores this process may use, counting each physical core once (SMT siblings share its units)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return usable
    cores, package = set(), None
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "physical id":
            package = value
        elif key == "core id":
            cores.add((package, value))
    return max(1, min(usable, len(cores) or usable))


def torch_threads(config: NodeConfig) -> int:
    """Torch threads for each of a model's two threads (generation, decoding; local_node/batcher.py):
    ``threads``, or half the physical cores each, so that the two run side by side."""
    return config.threads or max(1, physical_cores() // 2)


def use_product_cores(threads: int) -> int:
    """Let the node's kernels run products on the generation and decoding threads' cores together
    (the decoder's while it is idle: Kernels.reserved); never more threads than physical cores, as
    helpers spin between products. Returns how many they may use."""
    from local_node.kernels import cpu_kernels

    kernels = cpu_kernels.active()
    return 1 if kernels is None else kernels.use_cores(min(2 * threads, physical_cores()))


def log_kernel_tier() -> None:
    """Say which kernel tier runs and why, and what the vendor libraries are capped to."""
    from local_node.kernels import cpu_kernels

    kernels, why = cpu_kernels.choice()
    caps = ", ".join(f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if name in os.environ)
    log.info("kernels: %s (%s)%s", "portable" if kernels is None else kernels.tier, why, f"; {caps}" if caps else "")


def build_workers(config: NodeConfig, metrics: NodeMetrics | None = None) -> dict[str, ModelWorker]:
    """Load, warm up and wrap every enabled model. Announced to the relay only after this."""
    from local_node.engine.synthetic import SyntheticEngine

    workers = {}
    for model in config.enabled_models:
        if model.engine == "synthetic":
            engine = SyntheticEngine(model)
        else:
            from local_node.engine.qwen import QwenEngine

            engine = QwenEngine(model, config.dtype, config.codec_dtype, torch_threads(config))
            engine.warm_up()
        workers[model.name] = ModelWorker(engine, model.max_queue, metrics)
    return workers


def build_keeper(config: NodeConfig, workers: dict[str, ModelWorker]) -> VoiceKeeper:
    """The voices and consents this node keeps, given to the models that speak them."""
    from local_node.serving.voice_store import VoiceStore
    from local_node.serving.voices import VoiceKeeper

    cloners = {name: worker.engine for name, worker in workers.items() if worker.engine.info.clones}
    keeper = VoiceKeeper(VoiceStore(config.voices_dir), cloners)  # type: ignore[arg-type]  # info.clones: a Cloner
    keeper.load()
    return keeper


def run(config: NodeConfig) -> int:
    from local_node.engine.base import ModelUnavailable
    from local_node.serving.tunnel_client import Refused, TunnelClient, serve_relays

    if any(m.engine == "qwen" for m in config.enabled_models):
        import torch

        threads = torch_threads(config)
        torch.set_num_threads(threads)
        log_kernel_tier()
        product_threads = use_product_cores(threads)
        log.info(
            "torch %s on %s, %s, %d torch threads each for generation and decoding, products on up to %d",
            torch.__version__,
            config.device,
            config.dtype,
            threads,
            product_threads,
        )
    metrics, listener = NodeMetrics(), None
    if config.metrics:  # bound before the models load: a taken port stops the node at once
        try:
            listener = MetricsListener(metrics, config.metrics)
        except OSError as exc:
            log.error("config: metrics.listen: cannot listen on %s:%d: %s", config.metrics.host, config.metrics.port, exc.strerror or exc)
            return 2
    try:
        workers = build_workers(config, metrics)
    except ModelUnavailable as exc:
        log.error("%s", exc)
        return 1
    except ConfigError as exc:
        log.error("config: %s", exc)
        return 2
    try:
        keeper = build_keeper(config, workers)
    except OSError as exc:
        log.error("config: voices_dir: cannot use %s: %s", config.voices_dir, exc.strerror or exc)
        return 2
    clients = [
        TunnelClient(
            url, config.token, config.node_name, workers, config.ping_interval, config.ping_timeout, metrics=metrics, keeper=keeper
        )
        for url in config.relay_urls
    ]

    async def serve() -> None:
        # The metrics listener lives as long as the node serves, its drain included.
        async with listener or contextlib.nullcontext():
            await serve_relays(clients, config.drain_grace)

    try:
        asyncio.run(serve())
    except Refused as exc:
        log.error("stopping: %s", exc)
        return 2
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets.client").addFilter(RedactCredentials())
    try:
        capped = cap_vendor_libraries()  # before anything imports torch
    except TierError as exc:
        print(f"local_node: {exc}", file=sys.stderr)
        sys.exit(2)  # a setting to fix, not a model that failed to load (run.sh tells them apart)
    if capped:
        log.info("QWEN3_TTS_ISA=%s: set %s", requested(), ", ".join(f"{k}={v}" for k, v in capped.items()))
    if argv[:1] == ["tiny-model"]:
        parser = argparse.ArgumentParser(
            prog="python -m local_node tiny-model",
            description="Write a tiny randomly initialised Qwen3-TTS checkpoint (for tests and pipeline checks; it speaks noise).",
        )
        parser.add_argument("directory", type=Path)
        parser.add_argument("--type", required=True, choices=["base", "custom_voice", "voice_design"])
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(argv[1:])
        from local_node.testing.tiny_model import write_tiny_checkpoint

        print(write_tiny_checkpoint(args.directory, args.type, seed=args.seed))
        return
    parser = argparse.ArgumentParser(prog="python -m local_node", description="Run a Qwen3-TTS node that dials out to a relay.")
    parser.add_argument("--config", help="YAML config (default: $QWEN3_TTS_CONFIG or ./config-cpu-local.yaml)")
    args = parser.parse_args(argv)
    try:
        config = load_config(config_path(args.config))
    except ConfigError as exc:
        sys.exit(f"local_node: config: {exc}")
    sys.exit(run(config))


if __name__ == "__main__":
    main()
