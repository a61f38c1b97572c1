"""The tiny random checkpoints load and generate through the real qwen-tts code path."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from local_node.model.qwen_import import import_qwen_tts
from local_node.testing.tiny_model import write_tiny_checkpoint

qwen_tts = import_qwen_tts()

QWEN_FILES = Path(__file__).resolve().parents[1] / "local_node" / "testing" / "qwen_files"
SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 1920
MAX_NEW_TOKENS = 8
# The first talker step is the prefill, which yields no frame: without EOS, max_new_tokens
# steps give max_new_tokens - 1 frames.
FRAMES = MAX_NEW_TOKENS - 1
TEXT = "Hello there, this is a test."


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """model type -> its checkpoint folder (seed 0), written once per session."""

    @functools.cache
    def write(model_type: str) -> Path:
        return write_tiny_checkpoint(tmp_path_factory.mktemp(model_type), model_type)

    return write


def _load(root: Path, dtype: torch.dtype = torch.bfloat16):
    return qwen_tts.Qwen3TTSModel.from_pretrained(str(root), dtype=dtype, device_map="cpu")


# Session fixtures are set up before the function-scoped seeding below, so loading cannot shift
# the random state a generation starts from.
@pytest.fixture(scope="session")
def base(folder):
    return _load(folder("base"))


@pytest.fixture(scope="session")
def custom_voice(folder):
    return _load(folder("custom_voice"))


@pytest.fixture(scope="session")
def voice_design(folder):
    return _load(folder("voice_design"))


@pytest.fixture(autouse=True)
def seeded():
    # Generation samples; a fixed seed makes runs repeatable.
    torch.manual_seed(0)


def _check_audio(result, frames: int = FRAMES) -> None:
    wavs, sr = result
    assert sr == SAMPLE_RATE
    assert isinstance(wavs, list) and len(wavs) == 1
    wav = wavs[0]
    assert isinstance(wav, np.ndarray)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert wav.shape[0] == frames * SAMPLES_PER_FRAME
    assert np.isfinite(wav).all()
    assert wav.std() > 1e-4  # noise, not silence


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(
    "model_type, real_config",
    [
        ("base", "Qwen3-TTS-12Hz-0.6B-Base.json"),
        ("custom_voice", "Qwen3-TTS-12Hz-0.6B-CustomVoice.json"),
        ("voice_design", "Qwen3-TTS-12Hz-1.7B-VoiceDesign.json"),
    ],
)
def test_folder_is_small_and_keeps_the_real_ids(folder, model_type, real_config):
    root = folder(model_type)
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "speech_tokenizer/config.json",
        "speech_tokenizer/preprocessor_config.json",
        "speech_tokenizer/model.safetensors",
    ):
        assert (root / name).is_file(), name
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 50 * 2**20

    for name in ("vocab.json", "generation_config.json", "preprocessor_config.json"):
        assert (root / name).read_bytes() == (QWEN_FILES / "common" / name).read_bytes()

    tiny = json.loads((root / "config.json").read_text())
    real = json.loads((QWEN_FILES / "configs" / real_config).read_text())
    for key in ("tts_model_type", "tts_pad_token_id", "tts_bos_token_id", "tts_eos_token_id"):
        assert tiny[key] == real[key]
    tiny_talker, real_talker = tiny["talker_config"], real["talker_config"]
    for key in ("vocab_size", "text_vocab_size", "num_code_groups", "spk_id", "codec_language_id"):
        assert tiny_talker[key] == real_talker[key]
    assert tiny_talker["codec_eos_token_id"] == real_talker["codec_eos_token_id"] == 2150
    assert tiny_talker["hidden_size"] < real_talker["hidden_size"]

    codec = json.loads((root / "speech_tokenizer/config.json").read_text())
    assert codec["decode_upsample_rate"] == codec["encode_downsample_rate"] == SAMPLES_PER_FRAME
    decoder = codec["decoder_config"]
    assert np.prod(decoder["upsample_rates"] + decoder["upsampling_ratios"]) == SAMPLES_PER_FRAME


def test_custom_voice_generates(custom_voice):
    _check_audio(custom_voice.generate_custom_voice(TEXT, speaker="vivian", max_new_tokens=MAX_NEW_TOKENS))


def test_voice_design_generates(voice_design):
    _check_audio(voice_design.generate_voice_design(TEXT, instruct="A calm, low voice.", max_new_tokens=MAX_NEW_TOKENS))


@pytest.fixture(scope="module")
def reference_audio():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE  # one second: 13 frames once encoded
    return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE


def test_base_clones_in_context(base, reference_audio):
    items = base.create_voice_clone_prompt(ref_audio=reference_audio, ref_text="A reference.")
    assert items[0].icl_mode
    assert tuple(items[0].ref_code.shape) == (13, 16)
    assert items[0].ref_code.max() < 2048
    # The reference frames are decoded with the new ones and then cut off again.
    _check_audio(base.generate_voice_clone(TEXT, voice_clone_prompt=items, max_new_tokens=MAX_NEW_TOKENS))


def test_base_clones_from_x_vector_only(base, reference_audio):
    items = base.create_voice_clone_prompt(ref_audio=reference_audio, x_vector_only_mode=True)
    assert items[0].ref_code is None
    assert torch.isfinite(items[0].ref_spk_embedding.float()).all()
    _check_audio(base.generate_voice_clone(TEXT, voice_clone_prompt=items, max_new_tokens=MAX_NEW_TOKENS))


def test_loads_in_float32(folder):
    tts = _load(folder("custom_voice"), torch.float32)
    torch.manual_seed(0)  # loading ran after the autouse seeding
    assert tts.model.dtype == torch.float32
    _check_audio(tts.generate_custom_voice(TEXT, speaker="ryan", max_new_tokens=4), frames=3)


def test_same_seed_same_weights_and_real_files_untouched(folder, tmp_path):
    before = _tree_digest(QWEN_FILES)
    first = folder("custom_voice")  # seed 0
    again = write_tiny_checkpoint(tmp_path / "again", "custom_voice", seed=0)
    other = write_tiny_checkpoint(tmp_path / "other", "custom_voice", seed=1)
    assert _tree_digest(QWEN_FILES) == before

    for weights in ("model.safetensors", "speech_tokenizer/model.safetensors"):
        a, b, c = (load_file(root / weights) for root in (first, again, other))
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_eos_never_comes(folder):
    """Tests count frames on the tiny models (and the bench on real-shape ones), so EOS must never
    be sampled: its row of the talker's head is zero, its logit 0 sits mid-field, far from the top
    50 that sampling keeps, at every step of a free run."""
    from local_node.model.generation import SamplingConfig, generate_frames, prepare_prompt
    from local_node.model.packing import prepare_for_generation

    custom_voice = _load(folder("custom_voice"))
    talker = custom_voice.model.talker
    eos = custom_voice.model.config.talker_config.codec_eos_token_id
    assert not talker.codec_head.weight[eos].any()
    prepare_for_generation(custom_voice.model)  # lays the head's weight out for our product
    ranks = []
    head = talker.codec_head.forward
    talker.codec_head.forward = lambda h: ranks.append(int((head(h)[..., -1, :] > 0).sum())) or head(h)
    try:
        prompt = prepare_prompt(custom_voice, kind="custom_voice", text=TEXT, speaker="vivian")
        frames = list(generate_frames(custom_voice.model, prompt, SamplingConfig.from_tts(custom_voice, max_new_tokens=20)))
    finally:
        del talker.codec_head.forward
    assert len(frames) == 19 and len(ranks) == 19
    assert min(ranks) > 500  # hundreds of logits above EOS's at every step
