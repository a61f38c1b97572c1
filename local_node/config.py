"""The node's YAML configuration, validated strictly: an unknown key or a bad value stops the start
with a message that names it."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from tunnel.protocol import MAX_NAME_CHARS

DEFAULT_CONFIG = "config-cpu-local.yaml"
DTYPES = ("bfloat16", "float32")
CODEC_DTYPES = ("auto", *DTYPES)
ENGINES = ("qwen", "synthetic")
WEIGHTS = ("dtype", "int8")  # the node's dtype as loaded, or int8 projections (opt-in)
TEXT_INPUTS = ("auto", "whole", "streaming")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class VoiceConfig:
    name: str
    speaker: str | None = None  # CustomVoice: a built-in speaker
    ref_audio: Path | None = None  # Base: reference clip to clone
    ref_text: str | None = None  # Base: its transcript (in-context cloning); omitted -> x-vector only
    description: str | None = None  # VoiceDesign: the voice, described in words
    language: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    enabled: bool
    source: str  # Hugging Face id or local folder
    aliases: tuple[str, ...] = ()
    engine: str = "qwen"
    language: str | None = None  # None: detected automatically
    voices: tuple[VoiceConfig, ...] = ()
    max_queue: int = 4  # requests waiting behind the running ones; beyond that the relay answers 429
    max_batch: int = 4  # syntheses generated together, frame by frame (continuous batching)
    max_new_frames: int | None = None  # cap on generated codec frames per text piece
    # Frames per streamed audio chunk: small first (latency), larger after (throughput); the
    # last size repeats. Past 16 frames a chunk decodes no cheaper per frame on CPU, while the
    # frames still pending when the utterance ends (up to one chunk) are decoded after its last frame.
    chunk_frames: tuple[int, ...] = (1, 4, 8, 16)
    weights: str = "dtype"  # "int8": the decoder layers' projections in int8 (local_node/int8.py)
    text_input: str = "auto"  # "whole" text in the prompt, or "streaming" (a token per frame); auto: qwen-tts' default
    # Live text (/v1/audio/speech/stream, continuous): words to wait for before speaking begins.
    live_start_words: int = 2


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics:``: serve Prometheus' ``/metrics`` on ``host:port``, behind a bearer token."""

    host: str
    port: int
    token: str = field(repr=False)


@dataclass(frozen=True)
class NodeConfig:
    relay_urls: tuple[str, ...]  # the node keeps a connection to each
    token: str = field(repr=False)
    node_name: str = "node"
    device: str = "cpu"
    dtype: str = "bfloat16"
    # The speech codec's dtype. auto: bfloat16 where the CPU computes it natively (AVX-512 BF16,
    # AMX), float32 elsewhere, where bfloat16 convolutions are emulated and many times slower.
    codec_dtype: str = "auto"
    threads: int | None = None  # None: half the physical cores, for each of a model's two threads
    models: tuple[ModelConfig, ...] = ()
    # Websocket pings to each relay; one that stays silent is dropped within interval + timeout.
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    drain_grace: float = 120.0  # seconds open streams may take to finish after SIGTERM
    metrics: MetricsConfig | None = None  # None: no metrics listener
    # Uploaded voices and consent recordings (local_node/serving/voice_store.py); relative paths
    # are from the config file's folder.
    voices_dir: Path = Path("voices")

    @property
    def enabled_models(self) -> tuple[ModelConfig, ...]:
        return tuple(m for m in self.models if m.enabled)


def config_path(cli_value: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """``--config``, else ``QWEN3_TTS_CONFIG``, else ./config-cpu-local.yaml."""
    return Path(cli_value or environ.get("QWEN3_TTS_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> NodeConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, base_dir=path.parent, environ=environ)


def parse_config(data: Any, base_dir: Path = Path("."), environ: Mapping[str, str] = os.environ) -> NodeConfig:
    top = _Section(data, "config")
    relay = _Section(top.pop("relay", dict), "relay")
    relay_urls = relay.pop("url", (str, list))
    relay_urls = [relay_urls] if isinstance(relay_urls, str) else relay_urls
    if not relay_urls or len(set(map(str, relay_urls))) != len(relay_urls):
        raise ConfigError("relay.url must be a URL or a list of different URLs")
    insecure = relay.pop("insecure", bool, default=False)
    for url in relay_urls:
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ConfigError(f"relay.url must start with ws:// or wss://, not {url!r}")
        if url.startswith("ws://") and not insecure and not _is_loopback(url):
            raise ConfigError(
                f"relay.url {url}: ws:// carries the texts and the audio unencrypted, and lets anyone on "
                "the path take over the tunnel; use wss:// (TLS), or set relay.insecure: true on purpose "
                "(a network you trust)"
            )
    token = _token(relay, environ)
    node_name = _name(relay.pop("node_name", str, default="node"), "relay.node_name")
    ping_interval = _seconds(relay, "ping_interval", NodeConfig.ping_interval)
    ping_timeout = _seconds(relay, "ping_timeout", NodeConfig.ping_timeout)
    relay.finish()
    drain_grace = _seconds(top, "drain_grace", NodeConfig.drain_grace)
    metrics = _metrics(top.pop("metrics", dict, default=None), environ)

    device = top.pop("device", str, default="cpu")
    if device != "cpu":
        raise ConfigError(f"device: only 'cpu' is supported, not {device!r}")
    dtype = top.pop("dtype", str, default="bfloat16")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    codec_dtype = top.pop("codec_dtype", str, default="auto")
    if codec_dtype not in CODEC_DTYPES:
        raise ConfigError(f"codec_dtype must be one of {', '.join(CODEC_DTYPES)}, not {codec_dtype!r}")
    threads = top.pop("threads", (int, str), default="auto")
    if threads == "auto":
        threads = None
    elif isinstance(threads, str) or threads < 1:
        raise ConfigError(f"threads must be 'auto' or a positive integer, not {threads!r}")

    voices_dir = (base_dir / Path(top.pop("voices_dir", str, default="voices")).expanduser()).resolve()
    models_data = top.pop("models", dict)
    models = tuple(_model(name, spec, base_dir) for name, spec in models_data.items())
    top.finish()

    override = environ.get("ENABLED_MODELS")
    if override is not None:
        wanted = {n.strip() for n in override.split(",") if n.strip()}
        unknown = wanted - {m.name for m in models}
        if unknown:
            raise ConfigError(f"ENABLED_MODELS names models not in the config: {', '.join(sorted(unknown))}")
        models = tuple(replace(m, enabled=m.name in wanted) for m in models)
    if not any(m.enabled for m in models):
        raise ConfigError("no model is enabled: set enabled: true on one under models:, or use ENABLED_MODELS")
    return NodeConfig(
        relay_urls=tuple(relay_urls),
        token=token,
        node_name=node_name,
        device=device,
        dtype=dtype,
        codec_dtype=codec_dtype,
        threads=threads,
        models=models,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        drain_grace=drain_grace,
        metrics=metrics,
        voices_dir=voices_dir,
    )


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _seconds(section: _Section, key: str, default: float) -> float:
    value = section.pop(key, (int, float), default=default)
    if not 0 < value < float("inf"):
        raise ConfigError(f"{section._name(key)} must be a positive number of seconds")
    return float(value)


def _token(relay: _Section, environ: Mapping[str, str]) -> str:
    token = _secret(relay, environ)
    if not token:
        raise ConfigError("relay.token (or relay.token_env, the name of a variable holding it) is required")
    return token


def _secret(section: _Section, environ: Mapping[str, str]) -> str | None:
    """A section's ``token``, or the value of the environment variable its ``token_env`` names."""
    token = section.pop("token", str, default=None)
    token_env = section.pop("token_env", str, default=None)
    if token and token_env:
        raise ConfigError(f"{section.where}: give either token or token_env, not both")
    if token_env:
        token = environ.get(token_env)
        if not token:
            raise ConfigError(f"{section.where}.token_env: the environment variable {token_env} is not set")
    return token


def _metrics(data: dict | None, environ: Mapping[str, str]) -> MetricsConfig | None:
    if data is None:
        return None
    section = _Section(data, "metrics")
    listen = section.pop("listen", str)
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:9464
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics.listen must be host:port, e.g. 127.0.0.1:9464, not {listen!r}")
    token = _secret(section, environ)
    section.finish()
    # Required: what a node's metrics reveal (its models, its load, its relays) is not for anyone.
    if not token:
        raise ConfigError("metrics.token (or metrics.token_env, the name of a variable holding it) is required with metrics.listen")
    if len(token) < 16:
        raise ConfigError("metrics.token is shorter than 16 characters; use a long random value")
    return MetricsConfig(host, int(port), token)


def _model(name: Any, spec: Any, base_dir: Path) -> ModelConfig:
    where = f"models.{_name(name, 'models')}"
    section = _Section(spec, where)
    enabled = section.pop("enabled", bool, default=True)
    engine = section.pop("engine", str, default="qwen")
    if engine not in ENGINES:
        raise ConfigError(f"{where}.engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    source = section.pop("source", str, default="" if engine == "synthetic" else None)
    if engine == "qwen" and not source:
        raise ConfigError(f"{where}.source is required: a Hugging Face id or a local folder")
    if source and _looks_like_path(source, base_dir):
        source = str((base_dir / Path(source).expanduser()).resolve())
    aliases = section.pop("aliases", list, default=[])
    for alias in aliases:
        _name(alias, f"{where}.aliases")
    language = _language(section.pop("language", str, default=None), f"{where}.language")
    voices_data = section.pop("voices", dict, default={})
    voices = tuple(_voice(vname, vspec, f"{where}.voices", base_dir) for vname, vspec in voices_data.items())
    max_queue = section.pop("max_queue", int, default=4)
    if max_queue < 0:
        raise ConfigError(f"{where}.max_queue must be 0 or more")
    max_batch = section.pop("max_batch", int, default=ModelConfig.max_batch)
    if max_batch < 1:
        raise ConfigError(f"{where}.max_batch must be 1 or more")
    max_new_frames = section.pop("max_new_frames", int, default=None)
    if max_new_frames is not None and max_new_frames < 2:
        raise ConfigError(f"{where}.max_new_frames must be at least 2")
    chunk_frames = section.pop("chunk_frames", list, default=list(ModelConfig.chunk_frames))
    if not chunk_frames or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in chunk_frames):
        raise ConfigError(f"{where}.chunk_frames must be a list of positive frame counts, e.g. [1, 4, 8, 16]")
    weights = section.pop("weights", str, default="dtype")
    if weights not in WEIGHTS:
        raise ConfigError(f"{where}.weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    text_input = section.pop("text_input", str, default="auto")
    if text_input not in TEXT_INPUTS:
        raise ConfigError(f"{where}.text_input must be one of {', '.join(TEXT_INPUTS)}, not {text_input!r}")
    live_start_words = section.pop("live_start_words", int, default=ModelConfig.live_start_words)
    if live_start_words < 1:
        raise ConfigError(f"{where}.live_start_words must be 1 or more")
    section.finish()
    return ModelConfig(
        name=name,
        enabled=enabled,
        source=source,
        aliases=tuple(aliases),
        engine=engine,
        language=language,
        voices=voices,
        max_queue=max_queue,
        max_batch=max_batch,
        max_new_frames=max_new_frames,
        chunk_frames=tuple(chunk_frames),
        weights=weights,
        text_input=text_input,
        live_start_words=live_start_words,
    )


def _voice(name: Any, spec: Any, where: str, base_dir: Path) -> VoiceConfig:
    where = f"{where}.{_name(name, where)}"
    section = _Section(spec, where)
    speaker = section.pop("speaker", str, default=None)
    ref_audio = section.pop("ref_audio", str, default=None)
    ref_text = section.pop("ref_text", str, default=None)
    description = section.pop("description", str, default=None)
    language = _language(section.pop("language", str, default=None), f"{where}.language")
    section.finish()
    kinds = [k for k, v in (("speaker", speaker), ("ref_audio", ref_audio), ("description", description)) if v]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of speaker (CustomVoice), ref_audio (Base) or description (VoiceDesign)")
    if ref_text and not ref_audio:
        raise ConfigError(f"{where}.ref_text goes with ref_audio")
    audio_path = (base_dir / Path(ref_audio).expanduser()).resolve() if ref_audio else None
    if audio_path is not None and not audio_path.is_file():
        raise ConfigError(f"{where}.ref_audio: no such file {audio_path}")
    return VoiceConfig(name, speaker, audio_path, ref_text, description, language)


def _name(value: Any, where: str) -> str:
    """Names travel to the relay and into the API: short, plain strings."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise ConfigError(f"{where}: {value!r} is not a valid name (a string of 1 to {MAX_NAME_CHARS} characters)")
    return value


def _language(value: str | None, where: str) -> str | None:
    if value is None or value.lower() == "auto":
        return None
    return value.lower()


def _looks_like_path(source: str, base_dir: Path) -> bool:
    """A local folder rather than a Hugging Face id; such sources become absolute paths here."""
    return source.startswith((".", "/", "~")) or (base_dir / source).exists()


_MISSING = object()


class _Section:
    """Takes typed keys out of one mapping of the YAML; leftovers are unknown keys."""

    def __init__(self, data: Any, where: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping")
        self.data = dict(data)
        self.where = where

    def pop(self, key: str, kinds: Any, default: Any = _MISSING) -> Any:
        if key not in self.data or self.data[key] is None:
            self.data.pop(key, None)
            if default is _MISSING:
                raise ConfigError(f"{self._name(key)} is required")
            return default
        value = self.data.pop(key)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__.replace("str", "string").replace("dict", "mapping") for k in kinds)
            raise ConfigError(f"{self._name(key)} must be a {names}, not {value!r}")
        return value

    def finish(self) -> None:
        if self.data:
            key = sorted(map(str, self.data))[0]
            raise ConfigError(f"unknown key {self._name(key)}")

    def _name(self, key: str) -> str:
        return key if self.where == "config" else f"{self.where}.{key}"
