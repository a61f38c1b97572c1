"""Node YAML and relay environment configuration: defaults, overrides, and clear refusals."""

from pathlib import Path

import pytest

from local_node.config import ConfigError, load_config, parse_config
from relay.config import ConfigError as RelayConfigError
from relay.config import RelayConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {"QWEN3_TTS_NODE_TOKEN": "secret-token-1234567890"}


def minimal(**overrides):
    data = {
        "relay": {"url": "ws://127.0.0.1:9/v1/tunnel", "token_env": "QWEN3_TTS_NODE_TOKEN"},
        "models": {"a": {"source": "Qwen/x", "aliases": ["tts-1"]}, "b": {"source": "Qwen/y", "enabled": False}},
    }
    data.update(overrides)
    return data


def test_shipped_config_enables_the_custom_voice_model_with_openai_voice_names():
    config = load_config(ROOT / "config-cpu-local.yaml", ENV)
    assert [m.name for m in config.enabled_models] == ["custom_voice"]
    model = config.enabled_models[0]
    assert model.source == "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= set(model.aliases)
    openai_voices = {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar"}
    assert openai_voices == {v.name for v in model.voices}
    assert {m.name for m in config.models} == {"custom_voice", "base_small", "voice_design"}
    assert (config.dtype, config.device, config.threads, config.token) == ("bfloat16", "cpu", None, ENV["QWEN3_TTS_NODE_TOKEN"])
    assert config.codec_dtype == "auto"


@pytest.mark.parametrize("value", ["auto", "bfloat16", "float32"])
def test_codec_dtype(value):
    assert parse_config(minimal(codec_dtype=value), environ=ENV).codec_dtype == value


def test_enabled_models_override():
    config = parse_config(minimal(), environ={**ENV, "ENABLED_MODELS": "b"})
    assert [m.name for m in config.enabled_models] == ["b"]


def test_local_folder_sources_are_relative_to_the_config_file(tmp_path):
    config = parse_config(minimal(models={"a": {"source": "./models/a"}}), base_dir=tmp_path, environ=ENV)
    assert config.models[0].source == str((tmp_path / "models/a").resolve())


@pytest.mark.parametrize(
    "data, env, named",
    [
        (minimal(colour="blue"), ENV, "colour"),
        (minimal(relay={"url": "ws://127.0.0.1/v1/tunnel", "token_env": "QWEN3_TTS_NODE_TOKEN", "port": 1}), ENV, "relay.port"),
        (minimal(relay={"url": "http://x", "token": "t"}), ENV, "relay.url"),
        (minimal(relay={"url": "ws://relay.example.com/v1/tunnel", "token_env": "QWEN3_TTS_NODE_TOKEN"}), ENV, "wss://"),
        (minimal(relay={"url": "ws://192.168.1.5/v1/tunnel", "token_env": "QWEN3_TTS_NODE_TOKEN"}), ENV, "relay.insecure"),
        (minimal(relay={"url": "ws://127.0.0.1/v1/tunnel", "token_env": "MISSING_VAR"}), ENV, "MISSING_VAR"),
        (minimal(relay={"url": "ws://127.0.0.1/v1/tunnel"}), ENV, "relay.token"),
        (minimal(dtype="float16"), ENV, "dtype"),
        (minimal(codec_dtype="float16"), ENV, "codec_dtype"),
        (minimal(device="cuda"), ENV, "device"),
        (minimal(threads=0), ENV, "threads"),
        (minimal(threads="many"), ENV, "threads"),
        (minimal(models={"a": {"source": "Qwen/x", "enabled": "yes"}}), ENV, "models.a.enabled"),
        (minimal(models={"a": {"source": "Qwen/x", "flavour": 1}}), ENV, "models.a.flavour"),
        (minimal(models={"a": {"enabled": True}}), ENV, "models.a.source"),
        (minimal(models={"a": {"source": "Qwen/x", "voices": {"v": {"speaker": "a", "description": "b"}}}}), ENV, "models.a.voices.v"),
        (minimal(models={"a": {"source": "Qwen/x", "voices": {"v": {"ref_audio": "nope.wav"}}}}), ENV, "models.a.voices.v.ref_audio"),
        (minimal(models={"a": {"source": "Qwen/x", "max_queue": -1}}), ENV, "models.a.max_queue"),
        (minimal(models={"a": {"source": "Qwen/x", "enabled": False}}), ENV, "no model is enabled"),
        (minimal(), {**ENV, "ENABLED_MODELS": "zzz"}, "zzz"),
        (minimal(relay={"url": "ws://127.0.0.1/v1/tunnel", "token": "t", "node_name": ""}), ENV, "relay.node_name"),
        (minimal(models={"a": {"source": "Qwen/x", "aliases": ["x" * 129]}}), ENV, "models.a.aliases"),
        (minimal(models={"a": {"source": "Qwen/x", "aliases": [3]}}), ENV, "models.a.aliases"),
        (minimal(models={"a": {"source": "Qwen/x", "chunk_frames": [4, 0]}}), ENV, "models.a.chunk_frames"),
        (minimal(models={"a": {"source": "Qwen/x", "chunk_frames": []}}), ENV, "models.a.chunk_frames"),
        (minimal(models={"a": {"source": "Qwen/x", "weights": "int4"}}), ENV, "models.a.weights"),
        (minimal(models={"a": {"source": "Qwen/x", "max_batch": 0}}), ENV, "models.a.max_batch"),
        (minimal(models={"a": {"source": "Qwen/x", "text_input": "fast"}}), ENV, "models.a.text_input"),
    ],
)
def test_bad_config_names_the_key(data, env, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_config(data, environ=env)


def test_unreadable_or_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", ENV)
    bad = tmp_path / "bad.yaml"
    bad.write_text("relay: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, ENV)


def test_token_is_not_in_the_repr():
    config = parse_config(minimal(), environ=ENV)
    assert ENV["QWEN3_TTS_NODE_TOKEN"] not in repr(config)


def test_relay_refuses_to_start_open_unless_asked():
    with pytest.raises(RelayConfigError, match="RELAY_API_KEYS"):
        RelayConfig.from_env({"RELAY_NODE_TOKENS": "home:" + "n" * 20})
    with pytest.raises(RelayConfigError, match="RELAY_NODE_TOKENS"):
        RelayConfig.from_env({"RELAY_API_KEYS": "k" * 20})
    with pytest.raises(RelayConfigError, match="shorter than 16"):
        RelayConfig.from_env({"RELAY_API_KEYS": "short", "RELAY_NODE_TOKENS": "n" * 20})
    config = RelayConfig.from_env({"RELAY_REQUIRE_API_KEY": "false", "RELAY_NODE_TOKENS": "home:" + "n" * 20})
    assert not config.require_api_key


def test_relay_credentials_match_by_name():
    config = RelayConfig.from_env({"RELAY_API_KEYS": "app:" + "k" * 20 + "," + "j" * 20, "RELAY_NODE_TOKENS": "home:" + "n" * 20})
    assert config.api_keys.match("k" * 20) == "app"
    assert config.api_keys.match("j" * 20) == "key2"
    assert config.api_keys.match("k" * 19) is None
    assert config.api_keys.match(None) is None
    assert config.node_tokens.match("n" * 20) == "home"


@pytest.mark.parametrize(
    "url, insecure",
    [
        ("wss://relay.example.com/v1/tunnel", False),
        ("ws://127.0.0.1:8000/v1/tunnel", False),
        ("ws://localhost:8000/v1/tunnel", False),
        ("ws://[::1]:8000/v1/tunnel", False),
        ("ws://192.168.1.5:8000/v1/tunnel", True),  # on purpose, on a trusted network
    ],
)
def test_plain_ws_only_to_loopback_unless_asked(url, insecure):
    relay = {"url": url, "token_env": "QWEN3_TTS_NODE_TOKEN", **({"insecure": True} if insecure else {})}
    assert parse_config(minimal(relay=relay), environ=ENV).relay_urls == (url,)
