"""The talker's weights laid out for CPU generation, once, at load time: ``prepare_for_generation``.

Two changes, neither of which changes a number (the generation tests compare the codes with
qwen-tts' on an unprepared copy of the model, in bfloat16 and float32):

* **Fused projections.** In every decoder layer of the talker and the code predictor, q, k and v
  become one ``qkv_proj`` and the MLP's gate and up one ``gate_up_proj``: 4 products per layer
  instead of 7, 103 layers per frame. Each output is the same dot product either way, and
  measured bit-identical with oneDNN and MKL.
* **Packed bfloat16 weights.** PyTorch multiplies bfloat16 by an ``nn.Linear``'s bfloat16 weight
  through oneDNN, which reorders the weight into its blocked layout first, on every call. For the
  one-row products of generation that reorder costs more than the product, and with two threads
  it goes badly wrong: on this project's 2-core AVX-512 BF16 machine the talker's projections took
  0.4-1.2 s per pass that way, against 17 ms with the weights packed once (51 GB/s, memory bound).
  So each bias-free bfloat16 weight is laid out once for ``cpu_kernels.bf16_linear``, which
  reproduces oneDNN's sums bit for bit (checked per shape) at about 15 % less time per frame
  than oneDNN itself (no per-call set-up, one sequential stream of weights); where that kernel
  cannot run, for oneDNN's own packed layout (what ``torch.compile``'s CPU backend does under
  freezing, done eagerly; the same inner-product kernel, so bit-identical too). float32 weights
  stay as they are: PyTorch sends those to MKL, which needs no reorder.

Afterwards the decoder layers run only through ``DecoderStack`` (their Hugging Face ``forward``
would look for the separate projections).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from . import cpu_kernels


class PackedLinear(nn.Module):
    """An ``nn.Linear`` with a bfloat16 weight laid out once for ``cpu_kernels.bf16_linear``, or
    else in oneDNN's packed layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        ours = cpu_kernels.bf16_layout(weight) if linear.bias is None else None  # a bias rounds apart
        self.ours = ours is not None
        # oneDNN's batch-size hint only picks the layout; products with more rows stay exact and fast.
        self.weight = ours if self.ours else torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ours:
            return cpu_kernels.bf16_linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


@torch.no_grad()
def prepare_for_generation(model: Any, int8: bool = False) -> None:
    """Fuse and pack the talker of ``model`` (a Qwen3TTSForConditionalGeneration) in place, as
    the module docstring says; with ``int8`` the fused layer projections are quantized
    (``local_node/int8.py``) before the rest is packed. Once per model."""
    if is_prepared(model):
        raise RuntimeError("this model is already prepared for generation")
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = _fuse(attn, ("q_proj", "k_proj", "v_proj"))
        mlp.gate_up_proj = _fuse(mlp, ("gate_proj", "up_proj"))
    if int8:
        from .int8 import quantize_int8

        quantize_int8(model)
    if torch.backends.mkldnn.is_available():  # it is in PyTorch's x86 and Arm CPU wheels
        pack_linears(model.talker)


def decoder_layers(model: Any) -> Iterator[nn.Module]:
    """Every decoder layer of the talker and of its code predictor."""
    talker = model.talker
    yield from talker.model.layers
    yield from talker.code_predictor.model.layers


def is_prepared(model: Any) -> bool:
    return all(hasattr(layer.self_attn, "qkv_proj") for layer in decoder_layers(model))


def pack_linears(module: nn.Module) -> int:
    """Replace every bfloat16 ``nn.Linear`` under ``module`` with a ``PackedLinear``, in place;
    the unpacked weights are released. Returns how many were packed."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def _fuse(block: nn.Module, names: tuple[str, ...]) -> nn.Linear:
    """One ``nn.Linear`` computing ``block``'s projections ``names`` side by side; they are removed."""
    parts = [getattr(block, name) for name in names]
    if any(type(p) is not nn.Linear or p.bias is not None for p in parts):
        raise NotImplementedError(f"cannot fuse {names}: bias-free nn.Linear projections expected")
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    for name in names:
        delattr(block, name)
    return fused
