"""Our frame-by-frame loop (local_node.generation) against qwen-tts' own generate, on tiny checkpoints.

The reference is ``tts.model.generate`` called by the qwen-tts wrapper methods themselves
(generate_custom_voice & co.), so it gets exactly the inputs the wrapper builds; its
talker_codes_list is recorded and the waveform decoding skipped.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from local_node import cpu_kernels, generation, tiny_model
from local_node.generation import FrameBatch, Prompt, SamplingConfig, generate_frames, prepare_prompt
from local_node.packing import PackedLinear, prepare_for_generation
from local_node.qwen_import import import_qwen_tts
from local_node.tiny_model import write_random_checkpoint, write_tiny_checkpoint

qwen_tts = import_qwen_tts()

TEXT = "Hello there, this is a test of the frame loop."
GREEDY = dict(do_sample=False, subtalker_dosample=False)
METHOD = {"custom_voice": "generate_custom_voice", "voice_design": "generate_voice_design", "base": "generate_voice_clone"}
SLOW = os.environ.get("QWEN3_TTS_SLOW_TESTS") == "1"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny models are too small to gain from a second thread, and on a shared 2-core machine
    # OpenMP's spinning threads can make a step 50x slower when another process holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def load(tmp_path_factory):
    """(checkpoint, dtype, prepared) -> a loaded Qwen3TTSModel; ``prepared``: its projections fused
    and packed as the node prepares them, for our loop. Checkpoints: the three tiny kinds, and
    custom_voice_1b7, a CustomVoice model of the 1.7B layout (the 0.6B one ignores instruct)."""

    @functools.cache
    def folder(name: str) -> Path:
        if name == "custom_voice_1b7":
            return write_random_checkpoint(tmp_path_factory.mktemp(name), "1.7B-CustomVoice", tiny=True)
        return write_tiny_checkpoint(tmp_path_factory.mktemp(name), name)

    @functools.cache
    def load(name: str, dtype: torch.dtype = torch.float32, prepared: bool = False):
        tts = qwen_tts.Qwen3TTSModel.from_pretrained(str(folder(name)), dtype=dtype, device_map="cpu")
        if prepared:  # as the node runs it; qwen-tts' reference runs on a separate, untouched load
            prepare_for_generation(tts.model)
        return tts

    return load


@pytest.fixture(scope="session")
def clone_prompts(load):
    """(dtype, x_vector_only) -> voice clone prompt items from a one-second tone."""
    t = np.arange(24000) / 24000
    audio = ((0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)

    @functools.cache
    def make(dtype: torch.dtype, x_vector_only: bool):
        ref_text = None if x_vector_only else "A short reference."
        return load("base", dtype).create_voice_clone_prompt(ref_audio=audio, ref_text=ref_text, x_vector_only_mode=x_vector_only)

    return make


class _NoDecode:
    def decode(self, items):
        return [np.zeros(len(items[0]["audio_codes"]), np.float32)], 24000


def reference_codes(tts, kind: str, **kwargs) -> torch.Tensor:
    """qwen-tts' codes ([frames, 16]) through its wrapper method, decoding skipped."""
    model, recorded = tts.model, []
    real_generate = model.generate

    def recording_generate(**kw):
        result = real_generate(**kw)
        recorded.append(result[0])
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "generate", recording_generate)
        patch.setattr(model, "speech_tokenizer", _NoDecode())
        getattr(tts, METHOD[kind])(**kwargs)
    (codes,) = recorded[0]
    return codes


def our_codes(tts, kind: str, prompt_kw: dict, **sampling) -> torch.Tensor:
    prompt = prepare_prompt(tts, kind=kind, **prompt_kw)
    frames = list(generate_frames(tts.model, prompt, SamplingConfig.from_tts(tts, **sampling)))
    return torch.stack(frames) if frames else torch.empty(0, 16, dtype=torch.long)


def case_inputs(case: str, dtype, clone_prompts) -> tuple[str, str, dict]:
    """case -> (checkpoint, kind, the wrapper's voice arguments)."""
    common = dict(text=TEXT, language="English")
    if case == "custom_voice":
        return "custom_voice", "custom_voice", dict(common, speaker="vivian")
    if case == "custom_voice_streaming_text":  # trailing text fed one token per frame
        return "custom_voice", "custom_voice", dict(common, speaker="ryan", non_streaming_mode=False)
    if case == "custom_voice_1b7_instruct":
        return "custom_voice_1b7", "custom_voice", dict(common, speaker="vivian", instruct="Speak very slowly.")
    if case == "voice_design":
        return "voice_design", "voice_design", dict(common, instruct="A calm, low voice.")
    if case == "voice_design_streaming_text":
        return "voice_design", "voice_design", dict(common, instruct="A calm, low voice.", non_streaming_mode=False)
    if case == "base_icl":  # the wrapper's default for clones: streaming text
        return "base", "base", dict(common, voice_clone_prompt=clone_prompts(dtype, False))
    if case == "base_icl_non_streaming":
        return "base", "base", dict(common, voice_clone_prompt=clone_prompts(dtype, False), non_streaming_mode=True)
    if case == "base_x_vector_only":
        return "base", "base", dict(common, voice_clone_prompt=clone_prompts(dtype, True))
    raise AssertionError(case)


CASES = [
    "custom_voice",
    "custom_voice_streaming_text",
    "custom_voice_1b7_instruct",
    "voice_design",
    "voice_design_streaming_text",
    "base_icl",
    "base_icl_non_streaming",
    "base_x_vector_only",
]


# --- equivalence -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 7, 2048), (4, 1, 24, 128), (1, 40, 48, 128)])
def test_our_rms_norm_rounds_as_qwen_tts_module(shape, dtype):
    """DecoderStack's norm, without the module call, equals Qwen3TTSRMSNorm bit for bit, over
    magnitudes from 1e-3 to 1e3 and with outliers."""
    from local_node.decoder_stack import _rms_norm
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSRMSNorm

    generator = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    for trial in range(20):
        module = Qwen3TTSRMSNorm(shape[-1], eps=(1e-6, 1e-5)[trial % 2]).to(dtype)
        module.weight.data = (torch.randn(shape[-1], generator=generator) * 0.1 + 1).to(dtype)
        scale = 10 ** (6 * torch.rand(1, generator=generator).item() - 3)
        outliers = 1 + 20 * (torch.rand(shape, generator=generator) < 0.01)
        x = (torch.randn(shape, generator=generator) * scale * outliers).to(dtype)
        assert torch.equal(_rms_norm(x, module.weight, module.variance_epsilon), module(x))
        if dtype == torch.bfloat16 and cpu_kernels.available():  # and the C norm bf16 stacks use
            assert torch.equal(cpu_kernels.rms_norm(x, module.weight, module.variance_epsilon), module(x))


@pytest.mark.skipif(not cpu_kernels.available(), reason="cpu_kernels.c needs AVX-512 BF16 and VBMI and a C compiler")
def test_c_norm_with_rotation_rounds_as_the_torch_ops():
    """q and k heads of a fused q/k/v output (strided), a norm weight per head, then the rotary
    embedding: cpu_kernels.rms_norm in one call equals DecoderStack's torch ops bit for bit."""
    from local_node.decoder_stack import _rms_norm, _rotate_half

    generator = torch.Generator().manual_seed(5)
    n, steps, heads, kv_heads, dim = 2, 5, 16, 8, 128
    for trial in range(10):
        qkv = (torch.randn(n, steps, heads + 2 * kv_heads, dim, generator=generator) * 10 ** (trial % 5 - 2)).to(torch.bfloat16)
        weight = (torch.randn(heads + kv_heads, dim, generator=generator) * 0.2 + 1).to(torch.bfloat16)
        angles = torch.rand(n, 1, steps, dim, generator=generator) * 50
        cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
        want = _rms_norm(qkv[:, :, : heads + kv_heads], weight, 1e-6).transpose(1, 2)
        want = want * cos + _rotate_half(want) * sin
        got = cpu_kernels.rms_norm(qkv[:, :, : heads + kv_heads], weight, 1e-6, cos, sin).transpose(1, 2)
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_stacks_norm_and_attend_in_c_where_it_runs(load, dtype):
    """So the equivalence tests below cover the C norms and the C attention (one new position,
    rounded as SDPA) wherever they run."""
    batch = FrameBatch(load("custom_voice", dtype, prepared=True).model)
    fused = dtype == torch.bfloat16 and cpu_kernels.available()
    assert batch.talker.fused == batch.predictor.fused == fused
    assert batch.talker.attend_in_c == batch.predictor.attend_in_c == fused
    assert batch.talker.keys.dtype == dtype  # bf16 caches: SDPA's inputs, and the C call's


@pytest.mark.skipif(not cpu_kernels.available(), reason="cpu_kernels.c needs AVX-512 BF16 and VBMI and a C compiler")
def test_c_attention_hands_long_sequences_to_sdpa(load):
    """A bf16 talker stack stepping two rows past SDPA's first block of keys (512 positions) gives
    bit for bit what the stack attending through SDPA alone gives: the C call up to 511, SDPA after."""
    from local_node.decoder_stack import DecoderStack

    model = load("custom_voice", torch.bfloat16, prepared=True).model
    stacks = [DecoderStack(model.talker.model, capacity=64, batch=2) for _ in range(2)]
    stacks[1].attend_in_c = False
    hidden = model.config.talker_config.hidden_size
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, length, hidden, generator=generator).bfloat16() for length in (500, 480)]
    steps = torch.randn(40, 2, 1, hidden, generator=generator).bfloat16()
    outs = []
    for stack in stacks:
        for row, prompt in enumerate(prompts):
            stack.forward(prompt, rows=[row])
        outs.append(torch.cat([stack.forward(step) for step in steps]))
    assert stacks[0].lengths == [540, 520]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_greedy_codes_equal_qwen_tts(load, clone_prompts, case, dtype):
    checkpoint, kind, voice = case_inputs(case, dtype, clone_prompts)
    tts = load(checkpoint, dtype)
    ref = reference_codes(tts, kind, **voice, max_new_tokens=14, **GREEDY)
    prepared = load(checkpoint, dtype, prepared=True)
    assert any(isinstance(m, PackedLinear) for m in prepared.model.talker.modules()) == (dtype == torch.bfloat16)
    ours = our_codes(prepared, kind, voice, max_new_tokens=14, **GREEDY)
    assert ref.shape == (13, 16)  # random weights: no EOS, so max_new_tokens - 1 frames
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(
    "case, dtype, sampling",
    [
        ("custom_voice", torch.float32, {}),  # generation_config.json: T 0.9, top-k 50, penalty 1.05
        ("base_icl", torch.bfloat16, {}),
        ("voice_design", torch.float32, dict(top_p=0.8, top_k=0, temperature=1.3, repetition_penalty=1.5,
                                             subtalker_top_p=0.7, subtalker_temperature=0.6, subtalker_top_k=20)),
    ],
    ids=["custom_voice-defaults", "base_icl-bf16", "voice_design-top_p"],
)
def test_sampled_codes_equal_qwen_tts_from_the_same_global_seed(load, clone_prompts, case, dtype, sampling):
    # Same logits, same processors in the same order, random numbers drawn in the same order
    # (codebook 0, then 1..15, frame after frame): sampling reproduces qwen-tts too.
    checkpoint, kind, voice = case_inputs(case, dtype, clone_prompts)
    tts = load(checkpoint, dtype)
    torch.manual_seed(1234)
    ref = reference_codes(tts, kind, **voice, max_new_tokens=12, **sampling)
    torch.manual_seed(1234)
    ours = our_codes(load(checkpoint, dtype, prepared=True), kind, voice, max_new_tokens=12, **sampling)
    assert torch.equal(ours, ref)


def test_repetition_penalty_counts_only_generated_codebook_0(load, clone_prompts):
    # A strong penalty changes greedy codes; ours changes them exactly as qwen-tts does.
    checkpoint, kind, voice = case_inputs("custom_voice", torch.float32, clone_prompts)
    tts, prepared = load(checkpoint), load(checkpoint, prepared=True)
    penalised = our_codes(prepared, kind, voice, max_new_tokens=30, repetition_penalty=3.0, **GREEDY)
    assert not torch.equal(penalised, our_codes(prepared, kind, voice, max_new_tokens=30, repetition_penalty=1.0, **GREEDY))
    assert torch.equal(penalised, reference_codes(tts, kind, **voice, max_new_tokens=30, repetition_penalty=3.0, **GREEDY))


@pytest.mark.parametrize("max_new_tokens", [2, 3, 5])
def test_frame_count_is_max_new_tokens_minus_one(load, clone_prompts, max_new_tokens):
    checkpoint, kind, voice = case_inputs("voice_design", torch.float32, clone_prompts)
    tts = load(checkpoint)
    ref = reference_codes(tts, kind, **voice, max_new_tokens=max_new_tokens, **GREEDY)
    ours = our_codes(load(checkpoint, prepared=True), kind, voice, max_new_tokens=max_new_tokens, **GREEDY)
    assert len(ours) == max_new_tokens - 1
    assert torch.equal(ours, ref)


def test_one_new_token_is_no_frame(load, clone_prompts):
    # qwen-tts fails here (torch.stack of no frames); we yield nothing.
    checkpoint, kind, voice = case_inputs("voice_design", torch.float32, clone_prompts)
    assert len(our_codes(load(checkpoint, prepared=True), kind, voice, max_new_tokens=1)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("eos_at", [5, 0, 1])
def test_eos_stops_like_qwen_tts(load, clone_prompts, monkeypatch, dtype, eos_at):
    """Random weights never say EOS, so make EOS a code greedy decoding does produce: the
    codebook-0 code of frame ``eos_at``. At 5 generation stops there (that frame is not
    emitted); at 0 and 1 min_new_tokens=2 bars it and the utterance runs on differently."""
    checkpoint, kind, voice = case_inputs("custom_voice", dtype, clone_prompts)
    tts, prepared = load(checkpoint, dtype), load(checkpoint, dtype, prepared=True)
    free_run = our_codes(prepared, kind, voice, max_new_tokens=20, **GREEDY)
    eos = int(free_run[eos_at, 0])
    assert eos not in free_run[:eos_at, 0].tolist()
    for model in (tts, prepared):
        monkeypatch.setattr(model.model.config.talker_config, "codec_eos_token_id", eos)

    ref = reference_codes(tts, kind, **voice, max_new_tokens=20, **GREEDY)
    ours = our_codes(prepared, kind, voice, max_new_tokens=20, **GREEDY)
    assert torch.equal(ours, ref)
    assert len(ours) >= 2 and eos not in ours[:, 0].tolist()
    if eos_at >= 2:
        assert torch.equal(ours, free_run[:eos_at])
    else:
        assert not torch.equal(ours[:2], free_run[:2])


def test_logits_processors_are_the_ones_hf_generate_builds(load, clone_prompts, monkeypatch):
    """Record the processor lists HF generate builds for the talker and the code predictor
    inside qwen-tts, and compare them, in order and with their settings, to ours."""
    from transformers.generation.utils import GenerationMixin

    built: dict[str, list] = {}
    real = GenerationMixin._get_logits_processor

    def recording(self, *args, **kwargs):
        processors = real(self, *args, **kwargs)
        built.setdefault(type(self).__name__, describe(processors))
        return processors

    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", recording)
    checkpoint, kind, voice = case_inputs("voice_design", torch.float32, clone_prompts)
    tts = load(checkpoint)
    sampling = dict(top_p=0.8, temperature=1.3, repetition_penalty=1.5, subtalker_top_p=0.7, subtalker_top_k=20)
    reference_codes(tts, kind, **voice, max_new_tokens=3, **sampling)
    ours = SamplingConfig.from_tts(tts, **sampling)
    cfg = tts.model.config.talker_config
    assert built["Qwen3TTSTalkerForConditionalGeneration"] == describe(generation._talker_processors(ours, cfg))
    assert built["Qwen3TTSTalkerCodePredictorModelForConditionalGeneration"] == describe(generation._predictor_processors(ours))
    assert [name for name, _ in built["Qwen3TTSTalkerForConditionalGeneration"]] == [
        "RepetitionPenaltyLogitsProcessor", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
        "SuppressTokensLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
    ]


def describe(processors) -> list:
    def plain(value):
        return value.tolist() if isinstance(value, torch.Tensor) else value

    return [(type(p).__name__, {k: plain(v) for k, v in vars(p).items()}) for p in processors]


# --- prompt, sampling settings -------------------------------------------------------------


def test_prompt_is_qwen_tts_own(load, clone_prompts):
    tts = load("base")
    items = clone_prompts(torch.float32, False)
    prompt = prepare_prompt(tts, kind="base", text=TEXT, language="English", voice_clone_prompt=items)
    assert isinstance(prompt, Prompt) and prompt.inputs_embeds.shape[0] == 1
    assert torch.equal(prompt.ref_code, items[0].ref_code)  # qwen-tts decodes these before the new frames
    assert prepare_prompt(tts, kind="base", text=TEXT, voice_clone_prompt=clone_prompts(torch.float32, True)).ref_code is None
    with pytest.raises(ValueError, match="does not support"):
        prepare_prompt(tts, kind="custom_voice", text=TEXT, speaker="vivian")
    with pytest.raises(ValueError, match="Unsupported speakers"):
        prepare_prompt(load("custom_voice"), kind="custom_voice", text=TEXT, speaker="nobody")
    # The wrapper's quirks come along: a 1.7B CustomVoice model takes an instruct, a 0.6B one drops it.
    def length(checkpoint, instruct):
        voice = dict(kind="custom_voice", text=TEXT, speaker="vivian", instruct=instruct)
        return prepare_prompt(load(checkpoint), **voice).inputs_embeds.shape[1]

    assert length("custom_voice_1b7", "Speak slowly.") > length("custom_voice_1b7", None)
    assert length("custom_voice", "Speak slowly.") == length("custom_voice", None)
    # Nothing was patched on the shared model.
    assert "generate" not in vars(tts.model) and "generate" not in vars(tts.model.talker)


def test_sampling_defaults_come_from_generation_config(load):
    tts = load("custom_voice")
    defaults = json.loads((Path(tiny_model.__file__).parent / "qwen_files/common/generation_config.json").read_text())
    config = SamplingConfig.from_tts(tts)
    assert {k: getattr(config, k) for k in defaults} == defaults
    assert SamplingConfig.from_tts(tts, top_k=7, do_sample=False).top_k == 7


# --- streaming behaviour -----------------------------------------------------------------------


def _voice_design_prompt(load):
    tts = load("voice_design", prepared=True)
    return tts, prepare_prompt(tts, kind="voice_design", text=TEXT, instruct="A calm, low voice.")


def test_seeded_generator_is_reproducible(load):
    tts, prompt = _voice_design_prompt(load)
    sampling = SamplingConfig.from_tts(tts, max_new_tokens=10)

    def run(seed):
        return torch.stack(list(generate_frames(tts.model, prompt, sampling, generator=torch.Generator().manual_seed(seed))))

    first = run(7)
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(run(7), first)
    assert not torch.equal(run(8), first)


def test_frames_come_one_at_a_time_and_cancel_within_a_frame(load):
    tts, prompt = _voice_design_prompt(load)
    cancelled = threading.Event()
    frames = generate_frames(tts.model, prompt, SamplingConfig.from_tts(tts, max_new_tokens=50), cancelled=cancelled)
    got = [next(frames), next(frames), next(frames)]
    assert all(f.shape == (16,) and f.dtype == torch.long for f in got)
    assert not torch.is_inference_mode_enabled()  # the generator's inference mode stays inside it
    cancelled.set()
    assert list(frames) == []

    cancelled = threading.Event()
    cancelled.set()
    assert list(generate_frames(tts.model, prompt, SamplingConfig.from_tts(tts), cancelled=cancelled)) == []


def test_cancel_from_another_thread(load):
    tts, prompt = _voice_design_prompt(load)
    cancelled = threading.Event()
    count = 0
    for _ in generate_frames(tts.model, prompt, SamplingConfig.from_tts(tts, max_new_tokens=10_000), cancelled=cancelled):
        count += 1
        if count == 3:
            threading.Thread(target=cancelled.set).start()
            time.sleep(0.05)  # the set has happened before the next frame starts
    assert count == 3


# --- continuous batching ------------------------------------------------------------------------


def test_batched_utterances_match_each_alone(load):
    """Utterances joining and leaving a FrameBatch between steps, at different positions and with
    different prompt lengths (fp32, greedy: batched products round differently from single ones
    only far below what moves an argmax) get exactly the codes they get alone."""
    tts = load("custom_voice", prepared=True)
    texts = ["Hello.", "A somewhat longer sentence, with a pause.", "Third.", "And a fourth one, late."]
    prompts = [prepare_prompt(tts, kind="custom_voice", text=t, language="English", speaker="ryan") for t in texts]
    budgets = [6, 9, 4, 7]  # max_new_tokens: they end at different steps
    settings = [SamplingConfig.from_tts(tts, max_new_tokens=b, **GREEDY) for b in budgets]
    alone = [list(generate_frames(tts.model, p, s)) for p, s in zip(prompts, settings)]

    batch = generation.FrameBatch(tts.model, rows=2)  # fewer rows than utterances: the rest wait
    got: dict[int, list] = {i: [] for i in range(len(prompts))}
    waiting, live, steps = list(range(len(prompts))), {}, 0
    while waiting or live:
        while waiting and batch.free_rows and (steps > 0 or not live):
            i = waiting.pop(0)
            live[batch.add(prompts[i], settings[i])] = i
        for utterance, codes in batch.step().items():
            got[live[utterance]].append(codes)
        live = {u: i for u, i in live.items() if not u.done}
        steps += 1
    for i in range(len(prompts)):
        assert len(got[i]) == len(alone[i]) == budgets[i] - 1
        assert torch.equal(torch.stack(got[i]), torch.stack(alone[i])), f"utterance {i}"
    assert sorted(batch.free_rows) == [0, 1]


def test_batcher_decodes_the_last_chunk_on_generations_cores_too(load):
    """The decoding thread runs on ``threads`` torch threads, reserving as many cores from the
    products; an utterance's last chunk, once nothing is left to generate, on twice that."""
    from local_node.batcher import Batcher

    tts = load("custom_voice", prepared=True)
    prompt = prepare_prompt(tts, kind="custom_voice", text="Hello.", language="English", speaker="ryan")
    batcher = Batcher(tts.model, rows=1, name="test", threads=1)
    seen = []
    calls = batcher.run(prompt, SamplingConfig.from_tts(tts, max_new_tokens=4, **GREEDY), threading.Event(),
                        on_frame=lambda codes: seen.append(("frame", torch.get_num_threads())),
                        on_end=lambda: seen.append(("end", torch.get_num_threads())))
    assert list(calls) == []
    assert seen == [("frame", 1)] * 3 + [("end", 2)]


# --- the real 0.6B shape (random weights), opt-in --------------------------------------------


@pytest.mark.skipif(not SLOW, reason="set QWEN3_TTS_SLOW_TESTS=1 (about 1 GB of RAM, a minute on 2 cores)")
def test_real_shape_0_6b_greedy_equal_and_timing(load):
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration
    from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem

    config = json.loads((Path(tiny_model.__file__).parent / "qwen_files/configs/Qwen3-TTS-12Hz-0.6B-Base.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: about 2 GB rather than 4
        try:
            model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**config)).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        item = VoiceClonePromptItem(
            ref_code=torch.randint(0, 2048, (13, 16)),
            ref_spk_embedding=torch.randn(1024, dtype=torch.bfloat16),
            x_vector_only_mode=False, icl_mode=True, ref_text="A short reference.",
        )
    tiny = load("base")  # for its (real) text tokenizer and generation defaults
    tts = qwen_tts.Qwen3TTSModel(model, tiny.processor, tiny.generate_defaults)
    voice = dict(text=TEXT, language="English", voice_clone_prompt=[item])
    frames = 6

    started = time.perf_counter()
    ref = reference_codes(tts, "base", **voice, max_new_tokens=frames + 1, **GREEDY)
    ref_time = time.perf_counter() - started
    prepare_for_generation(model)  # as the node runs it
    started = time.perf_counter()
    ours = our_codes(tts, "base", voice, max_new_tokens=frames + 1, **GREEDY)
    our_time = time.perf_counter() - started
    print(f"\n0.6B bf16, {frames} frames incl. prefill: qwen-tts {ref_time / frames * 1000:.0f} ms/frame, "
          f"ours {our_time / frames * 1000:.0f} ms/frame")
    assert torch.equal(ours, ref)
