"""Opt-in int8 weights: the projections are replaced, stay close to the bf16 ones, and the model
still generates through our loop."""

from __future__ import annotations

import pytest
import torch

from local_node.kernels import cpu_kernels
from local_node.model.decoder_stack import DecoderStack
from local_node.model.generation import SamplingConfig, generate_frames, prepare_prompt
from local_node.model.int8 import Int8Linear
from local_node.model.packing import prepare_for_generation
from local_node.model.qwen_import import import_qwen_tts
from local_node.testing.tiny_model import write_tiny_checkpoint

qwen_tts = import_qwen_tts()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("int8"), "custom_voice"))


def test_int8_linear_is_close_to_the_bf16_one():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    for kernels in {cpu_kernels.active(), None}:
        quantized = Int8Linear(linear, kernels)
        assert quantized.weight.dtype == torch.int8 and quantized.scale.shape == (96,)
        want, got = linear(x).float(), quantized(x).float()
        assert got.shape == want.shape
        assert (got - want).norm() / want.norm() < 0.02  # per-row int8: about 0.5 % here
    with pytest.raises(ValueError):
        Int8Linear(torch.nn.Linear(4, 4, bias=True), None)


def test_int8_layout_refuses_minus_128(kernels):
    with pytest.raises(ValueError):  # the quantizer clamps to ±127; one layout has no place for -128
        kernels.int8_layout(torch.full((32, 2), -128, dtype=torch.int8))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9])  # past 4 rows (a tile), int8 blocks are widened once
@pytest.mark.parametrize("shape", [(64, 32), (96, 64), (4096, 1024), (1024, 3072)])
def test_our_int8_kernel_computes_what_pytorchs_does(kernels, rows, shape):
    """Our int8_linear against _weight_int8pack_mm on the same int8 weights and scales: both are
    bf16(scale * float32 sum), so they differ only where float32 sums in another order round to
    the other side of a bf16 rounding boundary."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16)
    ours, pytorchs = Int8Linear(linear, kernels), Int8Linear(linear, None)
    assert ours.kernels is kernels and pytorchs.kernels is None
    x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
    got, want = ours(x).float(), pytorchs(x).float()
    exact = (x.float().double() @ pytorchs.weight.double().T) * pytorchs.scale.double()
    # One bf16 step of the result, or float32 rounding of the sum where terms cancel.
    magnitude = (x.float().abs() @ pytorchs.weight.float().abs().T) * pytorchs.scale.float()
    assert ((got - want).abs() <= torch.maximum(want.abs() * 2**-7, magnitude * 2**-20)).all()
    assert (got != want).float().mean() < 0.01
    assert (got - exact).abs().max() <= (want - exact).abs().max() * 1.01 + 1e-6
    # The 3-D inputs of the decoder layers, and non-contiguous ones, come out the same.
    x3 = torch.randn(2, rows, shape[1], dtype=torch.bfloat16).transpose(0, 1)
    assert torch.equal(ours(x3), ours(x3.contiguous()))


def test_quantized_model_generates_near_the_bf16_logits(folder):
    tts = qwen_tts.Qwen3TTSModel.from_pretrained(folder, dtype=torch.bfloat16)
    quantized = qwen_tts.Qwen3TTSModel.from_pretrained(folder, dtype=torch.bfloat16)
    prepare_for_generation(tts.model)
    prepare_for_generation(quantized.model, int8=True)
    talker = quantized.model.talker
    layers = len(talker.model.layers) + len(talker.code_predictor.model.layers)
    assert sum(isinstance(m, Int8Linear) for m in talker.modules()) == 4 * layers  # qkv, o, gate_up, down

    prompt = prepare_prompt(tts, kind="custom_voice", text="Hello there.", language="English", speaker="ryan")
    # Same prompt through both talkers: their first codebook-0 distributions barely differ.
    logits, stacks = [], []
    for model in (tts.model, quantized.model):
        stacks.append(DecoderStack(model.talker.model, capacity=64))
        hidden = stacks[-1].forward(prompt.inputs_embeds)[:, -1]
        logits.append(model.talker.codec_head(hidden).double().log_softmax(-1))
    assert stacks[0].keys.dtype == stacks[1].keys.dtype == torch.bfloat16
    kl = torch.sum(logits[0].exp() * (logits[0] - logits[1])).item()
    assert 0 < kl < 0.05  # moved, a little

    sampling = SamplingConfig.from_tts(quantized, max_new_tokens=6)
    frames = list(generate_frames(quantized.model, prompt, sampling, generator=torch.Generator().manual_seed(0)))
    assert len(frames) == 5 and all(f.shape == (16,) and 0 <= int(f.min()) and int(f.max()) < 3072 for f in frames)


def test_quantized_stacks_norm_and_attend_in_c_as_the_torch_ops_would(folder, kernels):
    """An int8 stack's steps (one new position) norm and attend in one C call each; rows at
    different lengths get, within bfloat16 rounding, what PyTorch's ops (SDPA row by row) give
    them, caches included."""
    tts = qwen_tts.Qwen3TTSModel.from_pretrained(folder, dtype=torch.bfloat16)
    prepare_for_generation(tts.model, int8=True, tier=kernels.tier)
    torch.manual_seed(0)
    stacks = [DecoderStack(tts.model.talker.model, capacity=8, batch=2, own_ops=own) for own in (True, False)]
    assert stacks[0].kernels is kernels and stacks[1].kernels is None
    hidden = tts.model.config.talker_config.hidden_size
    prompts = [torch.randn(1, length, hidden, dtype=torch.bfloat16) for length in (3, 7)]  # the caches grow past 8
    outs = []
    for stack in stacks:
        for row, prompt in enumerate(prompts):
            stack.forward(prompt, rows=[row])
        outs.append(
            [stack.forward(torch.randn(2, 1, hidden, generator=torch.Generator().manual_seed(step)).bfloat16()) for step in range(4)]
        )
    for got, want in zip(*outs):
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
    assert stacks[0].lengths == stacks[1].lengths == [7, 11]
    torch.testing.assert_close(stacks[0].keys[:, :, :, :11], stacks[1].keys[:, :, :, :11], rtol=2**-6, atol=2**-6)
