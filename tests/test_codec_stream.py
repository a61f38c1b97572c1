"""StreamingDecoder: codec frames decoded chunk by chunk give the whole-utterance decode.

Tolerances, streamed PCM against ``speech_tokenizer.decode`` of all frames in the same dtype
(peaks here are about 0.06). They are rounding only: the stream carries exact state (KV cache,
convolution histories), so it computes the same samples, but kernels run on other lengths.
* float64: within one float32 ulp per sample. Inside, the two agree to ~1e-15 relative (the
  attention kernel sums in another order), and the final cast to float32 (``decode`` returns
  float32) could round such a difference either way. Measured: bit-identical, tiny and real shape.
* float32: max |diff| <= 1e-6 and SNR >= 100 dB (measured 8e-8 and 123 dB here, which is also the
  distance between the float32 and float64 whole decodes: the stream adds no error of its own).
* bfloat16: SNR >= 25 dB against the whole decode, and no further (within 3 dB) from the float64
  decode than the whole bfloat16 decode is. bfloat16 output is itself only about 31-34 dB from
  exact, and any one-ulp difference inside the network reaches that level; the tiny codec happens
  to stream bit-identically.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from local_node.engine.qwen import resolve_codec_dtype
from local_node.model.codec_stream import StreamingDecoder
from local_node.model.qwen_import import import_qwen_tts
from local_node.testing.tiny_model import write_tiny_checkpoint

qwen_tts = import_qwen_tts()

SAMPLES_PER_FRAME = 1920
SCHEDULE = (4, 8, 16, 32)
QWEN_FILES = Path(__file__).resolve().parents[1] / "local_node" / "testing" / "qwen_files"
REAL_CONFIG = QWEN_FILES / "common" / "speech_tokenizer" / "config.json"


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "custom_voice")
    return folder / "speech_tokenizer"


@pytest.fixture(scope="module")
def codec(codec_dir):
    """dtype -> the tiny checkpoint's 12 Hz Qwen3TTSTokenizer in that dtype (loaded once each)."""
    loaded = {}

    def load(dtype: torch.dtype):
        if dtype not in loaded:
            loaded[dtype] = qwen_tts.Qwen3TTSTokenizer.from_pretrained(str(codec_dir), dtype=dtype)
        return loaded[dtype]

    return load


def random_codes(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed))


def whole(speech_tokenizer, codes: torch.Tensor) -> np.ndarray:
    wavs, sample_rate = speech_tokenizer.decode([{"audio_codes": codes}])
    assert sample_rate == 24000
    return wavs[0]


def stream_chunks(speech_tokenizer, codes: torch.Tensor, schedule=SCHEDULE) -> list[np.ndarray]:
    decoder = StreamingDecoder(speech_tokenizer, schedule)
    chunks = []
    for frame in codes:
        pcm = decoder.push(frame)
        if pcm is not None:
            chunks.append(pcm)
    chunks.append(decoder.flush())
    return chunks


def stream(speech_tokenizer, codes: torch.Tensor, schedule=SCHEDULE) -> np.ndarray:
    return np.concatenate(stream_chunks(speech_tokenizer, codes, schedule))


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    noise = np.sum((reference - other.astype(np.float64)) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(reference**2) / noise)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def assert_matches(got: np.ndarray, ref: np.ndarray, dtype: torch.dtype, exact=None) -> None:
    """The tolerances in the module docstring; ``exact`` is the float64 decode, for bfloat16."""
    assert got.dtype == np.float32 and ref.dtype == np.float32
    assert got.shape == ref.shape
    if dtype == torch.float64:
        ulp = np.spacing(np.maximum(np.abs(got), np.abs(ref)))
        assert np.all(np.abs(got - ref) <= ulp)
    elif dtype == torch.float32:
        assert max_diff(got, ref) <= 1e-6
        assert snr_db(ref, got) >= 100
    else:
        assert snr_db(ref, got) >= 25
        assert snr_db(exact, got) >= snr_db(exact, ref) - 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_stream_matches_whole_decode(codec, dtype):
    codes = random_codes(40)
    ref = whole(codec(dtype), codes)
    assert ref.shape == (40 * SAMPLES_PER_FRAME,)
    assert np.abs(ref).max() > 0.01  # not silence
    exact = whole(codec(torch.float64), codes) if dtype == torch.bfloat16 else None
    assert_matches(stream(codec(dtype), codes), ref, dtype, exact)


def test_stream_exact_with_every_branch_loud(codec_dir):
    """Random init scales the ConvNeXt branches by 1e-6 and the attention and MLP branches by
    0.01; turned up, a mistake in their streaming state could not hide under rounding."""
    loud = qwen_tts.Qwen3TTSTokenizer.from_pretrained(str(codec_dir), dtype=torch.float64)
    with torch.no_grad():
        for name, param in loud.model.decoder.named_parameters():
            if name.endswith(("gamma", "layer_scale.scale")):
                param.fill_(0.3)
    codes = random_codes(40, seed=1)
    assert_matches(stream(loud, codes), whole(loud, codes), torch.float64)


def test_chunks_follow_the_schedule(codec):
    speech_tokenizer = codec(torch.float32)
    decoder = StreamingDecoder(speech_tokenizer)  # default (1, 4, 8, 16)
    returned_at = {}
    for i, frame in enumerate(random_codes(70)):
        pcm = decoder.push(frame)
        if pcm is not None:
            returned_at[i + 1] = len(pcm) // SAMPLES_PER_FRAME
            assert len(pcm) % SAMPLES_PER_FRAME == 0 and pcm.dtype == np.float32
    # The first chunk comes with the first frame; the last size repeats.
    assert returned_at == {1: 1, 5: 4, 13: 8, 29: 16, 45: 16, 61: 16}
    assert decoder.pending_frames == 9
    assert len(decoder.flush()) == 9 * SAMPLES_PER_FRAME
    assert decoder.pending_frames == 0


@pytest.mark.parametrize("schedule", [(1,), (3, 5)])
def test_custom_schedule(codec, schedule):
    speech_tokenizer = codec(torch.float32)
    codes = random_codes(14, seed=2)
    chunks = stream_chunks(speech_tokenizer, codes, schedule)
    sizes = [len(c) // SAMPLES_PER_FRAME for c in chunks]
    assert sizes == ([1] * 14 + [0] if schedule == (1,) else [3, 5, 5, 1])
    assert_matches(np.concatenate(chunks), whole(speech_tokenizer, codes), torch.float32)


@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_utterance_comes_out_on_flush(codec, frames, dtype):
    speech_tokenizer = codec(dtype)
    codes = random_codes(frames, seed=3)
    decoder = StreamingDecoder(speech_tokenizer, (4,))  # shorter than the first chunk
    assert all(decoder.push(frame) is None for frame in codes)
    pcm = decoder.flush()
    assert pcm.shape == (frames * SAMPLES_PER_FRAME,)
    exact = whole(codec(torch.float64), codes)
    assert_matches(pcm, whole(speech_tokenizer, codes), dtype, exact)


def test_flush_without_frames_and_reuse_after_flush(codec):
    speech_tokenizer = codec(torch.float32)
    decoder = StreamingDecoder(speech_tokenizer, (4,))
    assert decoder.flush().shape == (0,)
    first, second = random_codes(10, seed=4), random_codes(7, seed=5)
    for codes in (first, second):  # the second utterance must not continue the first
        chunks = [decoder.push(frame) for frame in codes] + [decoder.flush()]
        got = np.concatenate([c for c in chunks if c is not None])
        assert_matches(got, whole(speech_tokenizer, codes), torch.float32)


def test_long_utterance_restarts_like_the_reference(codec):
    """``decode`` itself works in 300-frame pieces, each after 25 frames of context."""
    speech_tokenizer = codec(torch.float64)
    codes = random_codes(330, seed=6)
    got = stream(speech_tokenizer, codes, (4, 64))
    assert_matches(got, whole(speech_tokenizer, codes), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prime_continues_after_unreturned_frames(codec, dtype):
    """Voice cloning decodes the reference's codes in front of the new ones and cuts them off."""
    speech_tokenizer = codec(dtype)
    reference, codes = random_codes(30, seed=7), random_codes(20, seed=8)
    decoder = StreamingDecoder(speech_tokenizer, (4, 8))
    decoder.prime(reference)
    chunks = [decoder.push(frame) for frame in codes] + [decoder.flush()]
    got = np.concatenate([c for c in chunks if c is not None])
    ref = whole(speech_tokenizer, torch.cat([reference, codes]))[30 * SAMPLES_PER_FRAME :]
    assert_matches(got, ref, dtype)


def test_accepts_wrapper_model_or_decoder_and_rejects_bad_frames(codec):
    speech_tokenizer = codec(torch.float32)
    for target in (speech_tokenizer, speech_tokenizer.model, speech_tokenizer.model.decoder):
        assert StreamingDecoder(target).samples_per_frame == SAMPLES_PER_FRAME
    with pytest.raises(TypeError):
        StreamingDecoder(object())
    with pytest.raises(ValueError):
        StreamingDecoder(speech_tokenizer, ())
    decoder = StreamingDecoder(speech_tokenizer)
    with pytest.raises(ValueError):
        decoder.push(torch.zeros(15, dtype=torch.long))
    with pytest.raises(ValueError):
        decoder.push(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError):
        decoder.push(torch.full((16,), 2048))
    with pytest.raises(ValueError):
        decoder.push(torch.full((16,), -1))
    with pytest.raises(TypeError):
        decoder.push(torch.zeros(16))
    assert decoder.pending_frames == 0
    decoder.push(random_codes(1)[0])
    with pytest.raises(RuntimeError):
        decoder.prime(random_codes(3))


# ---------------------------------------------------------------- real-shape codec


def real_shape_decoder(seed: int = 0):
    """The released codec decoder's shapes (114 M parameters), randomly initialised.

    Randomised as in ``tiny_model``: learnt codebooks, fan-in scaled convolutions (the released
    init would fade the signal to ~1e-9) and a quiet output layer.
    """
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2Config,
    )
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2Decoder,
    )

    config = Qwen3TTSTokenizerV2Config(**copy.deepcopy(json.loads(REAL_CONFIG.read_text())))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        decoder = Qwen3TTSTokenizerV2Decoder._from_config(config.decoder_config).eval()
        for name, param in decoder.named_parameters():
            if name.endswith("embedding_sum"):
                param.normal_()
        for module in decoder.modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear)):
                module.reset_parameters()
        decoder.decoder[-1].conv.weight.mul_(0.1)
    return decoder


def whole_decoder(decoder, codes: torch.Tensor) -> np.ndarray:
    """What ``Qwen3TTSTokenizerV2Model.decode`` returns for valid codes, from the bare decoder."""
    with torch.inference_mode():
        return decoder.chunked_decode(codes.T[None])[0, 0].to(torch.float32).numpy()


@pytest.fixture(scope="module")
def real_decoder():
    return real_shape_decoder()


def test_real_shape_codec_float32(real_decoder):
    real_decoder.to(torch.float32)
    codes = random_codes(6, seed=9)
    ref = whole_decoder(real_decoder, codes)
    chunks = stream_chunks(real_decoder, codes, (2, 3))
    assert [len(c) // SAMPLES_PER_FRAME for c in chunks] == [2, 3, 1]
    assert_matches(np.concatenate(chunks), ref, torch.float32)


@pytest.mark.skipif(
    resolve_codec_dtype("auto") != torch.bfloat16 and not os.environ.get("CODEC_STREAM_SLOW_TESTS"),
    reason="this CPU has no bfloat16 arithmetic, so bfloat16 convolutions are emulated (seconds per frame); set CODEC_STREAM_SLOW_TESTS=1",
)
def test_real_shape_codec_bfloat16(real_decoder):
    codes = random_codes(6, seed=9)
    exact = whole_decoder(real_decoder.to(torch.float64), codes)
    real_decoder.to(torch.bfloat16)
    try:
        ref = whole_decoder(real_decoder, codes)
        got = np.concatenate(stream_chunks(real_decoder, codes, (2, 3)))
        assert_matches(got, ref, torch.bfloat16, exact)
    finally:
        real_decoder.to(torch.float32)
