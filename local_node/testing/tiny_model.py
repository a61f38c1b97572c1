"""Randomly initialised Qwen3-TTS 12 Hz checkpoints: tiny ones for tests, real-shape ones for benchmarks.

For tests and the offline pipeline check: a folder of about 20 MB (most of it the real text
tokenizer and the 151936-row text embedding) laid out like a released model.
``Qwen3TTSModel.from_pretrained`` loads it through its normal code path in a second or two, and
it generates an 80 ms frame in tens of milliseconds on a CPU. The weights are random, so the
audio is noise; and EOS never comes (its row of the talker's output head is zero, so its logit
sits mid-field, outside the top 50 that sampling keeps and below the argmax), so an utterance
always runs to its frame budget, which tests and the bench count on: pass ``max_new_tokens``.

The configs are the real ones from ``qwen_files/`` with only sizes shrunk. Every token id, the
151936-entry text vocabulary, the 3072-entry codec vocabulary, the 16 code groups, the 2048-entry
codebooks, speaker and language ids, sample rates and the codec's up/down-sampling (1920 samples
per frame at 24 kHz) stay as released.

``write_random_checkpoint(..., tiny=False)`` keeps the released sizes too: the real compute and
memory of a model (0.6B: ~1.9 GB, 1.7B: ~4.5 GB on disk in bf16) with none of its skill.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Literal

import torch

from local_node.model.qwen_import import import_qwen_tts

ModelType = Literal["base", "custom_voice", "voice_design"]

_FILES = Path(__file__).parent / "qwen_files"
MODELS = ("0.6B-Base", "0.6B-CustomVoice", "1.7B-Base", "1.7B-CustomVoice", "1.7B-VoiceDesign")  # released 12 Hz models
_TINY_MODELS: dict[str, str] = {"base": "0.6B-Base", "custom_voice": "0.6B-CustomVoice", "voice_design": "1.7B-VoiceDesign"}
_COMMON = (
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "preprocessor_config.json",
)


def write_tiny_checkpoint(directory: str | Path, model_type: ModelType, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-TTS checkpoint of ``model_type`` into ``directory``.

    The same ``seed`` gives the same weights. Returns the folder.
    """
    if model_type not in _TINY_MODELS:
        raise ValueError(f"model_type must be one of {sorted(_TINY_MODELS)}, not {model_type!r}")
    return write_random_checkpoint(directory, _TINY_MODELS[model_type], tiny=True, seed=seed)


def write_random_checkpoint(directory: str | Path, model: str, *, tiny: bool, seed: int = 0) -> Path:
    """Write a random checkpoint of a released model's config (one of ``MODELS``), shrunk if
    ``tiny``, into ``directory``. The same ``seed`` gives the same weights. Returns the folder."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    import_qwen_tts()
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2Config,
    )
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2Model,
    )

    out = Path(directory)
    (out / "speech_tokenizer").mkdir(parents=True, exist_ok=True)
    model_cfg = _read_json(_FILES / "configs" / f"Qwen3-TTS-12Hz-{model}.json")
    codec_cfg = _read_json(_FILES / "common/speech_tokenizer/config.json")
    if tiny:
        model_cfg, codec_cfg = _shrink_model_config(model_cfg), _shrink_codec_config(codec_cfg)

    # Fork the RNG so writing a checkpoint leaves the caller's torch random state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Released weights are bf16; built in bf16, a real-shape 1.7B needs 4.5 GB rather than 9.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**copy.deepcopy(model_cfg)))
        finally:
            torch.set_default_dtype(default_dtype)
        with torch.no_grad():  # EOS's logit 0, mid-field among random ones: never in the top 50, never the argmax
            model.talker.codec_head.weight[model.config.talker_config.codec_eos_token_id] = 0
        model.save_pretrained(out)
        del model

        codec = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**copy.deepcopy(codec_cfg)))
        _randomise_codec(codec)
        codec.save_pretrained(out / "speech_tokenizer")

    # save_pretrained's config.json does not load back (the speaker encoder config takes no
    # extra keys such as model_type), so write the released layout with the shrunk sizes.
    _write_json(out / "config.json", model_cfg)
    _write_json(out / "speech_tokenizer/config.json", codec_cfg)
    for name in _COMMON:
        shutil.copyfile(_FILES / "common" / name, out / name)
    shutil.copyfile(
        _FILES / "common/speech_tokenizer/preprocessor_config.json",
        out / "speech_tokenizer/preprocessor_config.json",
    )
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _shrink_model_config(cfg: dict) -> dict:
    talker = cfg["talker_config"]
    predictor = talker["code_predictor_config"]
    # Dividing the widths (rather than fixing them) keeps the 1.7B talker wider than its code
    # predictor, so the VoiceDesign checkpoint still exercises the projection between them.
    talker.update(
        hidden_size=talker["hidden_size"] // 32,
        intermediate_size=talker["intermediate_size"] // 32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        text_hidden_size=16,
    )
    # mrope sections split half the head dim; [6, 5, 5] is the real [24, 20, 20] scaled by 1/4.
    talker["rope_scaling"]["mrope_section"] = [6, 5, 5]
    predictor.update(
        hidden_size=predictor["hidden_size"] // 32,
        intermediate_size=predictor["intermediate_size"] // 32,
        num_hidden_layers=1,
        layer_types=["full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    )
    if "speaker_encoder_config" in cfg:
        # The x-vector is fed in as one codec-embedding position, so it must be talker-wide.
        cfg["speaker_encoder_config"].update(
            enc_dim=talker["hidden_size"],
            # The real [512, 512, 512, 512, 1536] / 16; the last is the three SE-Res2Net
            # outputs concatenated, so it must stay 3x the others.
            enc_channels=[32, 32, 32, 32, 96],
            enc_attention_channels=8,
            enc_se_channels=8,
        )
    return cfg


def _shrink_codec_config(cfg: dict) -> dict:
    cfg["decoder_config"].update(
        latent_dim=32,
        codebook_dim=16,
        decoder_dim=48,  # halved by each of the four upsampling blocks
        hidden_size=32,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vector_quantization_hidden_dimension=16,
    )
    cfg["encoder_config"].update(
        hidden_size=32,
        intermediate_size=128,
        num_filters=4,
        codebook_dim=8,
        vector_quantization_hidden_dimension=8,
        head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=1,
        upsample_groups=32,  # depthwise, as the real 512 groups over 512 channels
    )
    return cfg


@torch.no_grad()
def _randomise_codec(codec: torch.nn.Module) -> None:
    # The codebooks start as zeros (they are learnt as running sums), which would make every
    # code decode to silence and every encoded frame code 0.
    for name, tensor in [*codec.named_parameters(), *codec.named_buffers()]:
        if name.endswith(("embedding_sum", "embed_sum")):
            tensor.normal_()
    # qwen-tts initialises the decoder's convolutions with std 0.02, which shrinks the signal about
    # tenfold per layer, down to ~1e-9 at the waveform. PyTorch's fan-in scaled default keeps it
    # near unit scale; the output layer is then turned down so the noise is not clipped at +-1.
    for module in codec.decoder.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear)):
            module.reset_parameters()
    output = codec.decoder.decoder[-1].conv
    output.weight.mul_(0.1)
    output.bias.zero_()
