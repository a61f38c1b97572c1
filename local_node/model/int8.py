"""Opt-in int8 weights: ``weights: int8`` on a model in the node's YAML.

At batch 1 a frame reads every weight of the talker once and of the code predictor 15 times, so
the bytes read set the pace. Here the projections of every decoder layer (talker and code
predictor: attention q/k/v/o and the MLP, nearly all the bytes read per frame) are stored as int8
with one scale per output row, symmetric. Embeddings, norms, the output heads and the codec stay
as they are.

The products: with bfloat16 activations, the node's kernels (``cpu_kernels``: ``int8_linear``),
which read the int8 weights at nearly the memory's speed; where those do not run, PyTorch's
weight-only int8 kernel (``_weight_int8pack_mm``), which is compute-bound on most CPUs but still
halves the memory. Both compute bf16(scale * sum(x * w)) with float32 sums; the tests hold them to
each other.

It changes the numbers: codes no longer follow qwen-tts' and the voice may drift.
``./bench.sh`` reports how far the logits move (KL divergence per frame against the unquantised
model). Off by default until judged by ear on real weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from local_node.kernels import cpu_kernels


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` with int8 weights and a scale per output row, multiplied by
    ``kernels`` (for bfloat16 models, where the shape suits them) or else by PyTorch."""

    def __init__(self, linear: nn.Linear, kernels: cpu_kernels.Kernels | None) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free projections")
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(linear.weight.dtype)
        quantized = (weight / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bf16 = linear.weight.dtype == torch.bfloat16
        ours = kernels.int8_layout(quantized) if kernels is not None and bf16 else None
        self.kernels = kernels if ours is not None else None
        self.register_buffer("weight", quantized if ours is None else ours)
        self.register_buffer("scale", scale if ours is None else scale.float())  # ours takes float32 scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:  # its weight is in our layout, which PyTorch's kernel cannot read
            return self.kernels.int8_linear(x, self.weight, self.scale)
        out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scale)  # 2-D only
        return out.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize_int8(model: Any, kernels: cpu_kernels.Kernels | None) -> int:
    """Replace the projections of every talker and code-predictor layer of ``model`` (a
    Qwen3TTSForConditionalGeneration) with ``Int8Linear`` for ``kernels``, in place. Returns how
    many."""
    talker = model.talker
    count = 0
    for layer in (*talker.model.layers, *talker.code_predictor.model.layers):
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(block, name, Int8Linear(child, kernels))
                    count += 1
    return count
