"""The talker's weights laid out for CPU generation, once, at load time: ``prepare_for_generation``.

Two changes:

* **Fused projections.** In every decoder layer of the talker and the code predictor, q, k and v
  become one ``qkv_proj`` and the MLP's gate and up one ``gate_up_proj``: 4 products per layer
  instead of 7, 103 layers per frame. Each output is the same dot product either way.
* **Packed bfloat16 weights.** Each bias-free bfloat16 weight is laid out once for the node's
  kernels (``cpu_kernels``: ``bf16_linear``), whose float32 sums define the node's numbers (the
  generation tests hold them to qwen-tts' by stated tolerances). Where those kernels do not run
  (``portable``, no compiler), the weight goes into oneDNN's packed layout where oneDNN can
  multiply bfloat16 on this CPU (PyTorch would otherwise reorder it on every call, which for the
  one-row products of generation costs more than the product), else stays an ``nn.Linear``.
  float32 weights stay as they are: PyTorch sends those to MKL, which needs no reorder.

Afterwards the decoder layers run only through ``DecoderStack`` (their Hugging Face ``forward``
would look for the separate projections); the stacks use the kernels their weights were laid out
for.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from local_node.kernels import cpu_kernels


class PackedLinear(nn.Module):
    """An ``nn.Linear`` with a bfloat16 weight laid out once for ``kernels`` (bias-free), else for
    oneDNN where it can, else kept as it is. ``layout`` says which: "ours", "onednn" or "plain"."""

    def __init__(self, linear: nn.Linear, kernels: cpu_kernels.Kernels | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        ours = kernels.bf16_layout(weight) if kernels is not None and self.bias is None else None
        onednn = _onednn_packed(weight) if ours is None else None
        self.kernels = kernels if ours is not None else None
        self.layout = "ours" if ours is not None else "onednn" if onednn is not None else "plain"
        self.weight = next(w for w in (ours, onednn, weight) if w is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.bf16_linear(x, self.weight)
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` in oneDNN's packed layout, or None where oneDNN does not multiply bfloat16 here
    (a CPU without AVX-512 or AVX-NE-CONVERT, or ``ONEDNN_MAX_CPU_ISA`` below them): it says so only
    by raising. The batch-size hint only picks the layout; products with more rows stay fast."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    except RuntimeError:
        return None


@torch.no_grad()
def prepare_for_generation(model: Any, int8: bool = False, tier: str | None = None) -> None:
    """Fuse and pack the talker of ``model`` (a Qwen3TTSForConditionalGeneration) in place, as
    the module docstring says; with ``int8`` the fused layer projections are quantized
    (``local_node/int8.py``) before the rest is packed. For the node's kernels
    (``cpu_kernels.active()``), or ``tier``'s. Once per model."""
    kernels = cpu_kernels.active() if tier is None else cpu_kernels.kernels(tier)
    if tier is not None and tier != "portable" and kernels is None:
        raise ValueError(f"the {tier} kernels do not run on this machine")
    if is_prepared(model):
        raise RuntimeError("this model is already prepared for generation")
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = _fuse(attn, ("q_proj", "k_proj", "v_proj"))
        mlp.gate_up_proj = _fuse(mlp, ("gate_proj", "up_proj"))
    if int8:
        from local_node.model.int8 import quantize_int8

        quantize_int8(model, kernels)
    pack_linears(model.talker, kernels)


def decoder_layers(model: Any) -> Iterator[nn.Module]:
    """Every decoder layer of the talker and of its code predictor."""
    talker = model.talker
    yield from talker.model.layers
    yield from talker.code_predictor.model.layers


def is_prepared(model: Any) -> bool:
    return all(hasattr(layer.self_attn, "qkv_proj") for layer in decoder_layers(model))


def pack_linears(module: nn.Module, kernels: cpu_kernels.Kernels | None) -> int:
    """Replace every bfloat16 ``nn.Linear`` under ``module`` with a ``PackedLinear``, in place;
    the unpacked weights are released. Returns how many were packed."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedLinear(child, kernels))
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
