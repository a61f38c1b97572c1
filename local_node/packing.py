"""bfloat16 projections with their weights packed for oneDNN once, at load time.

PyTorch multiplies bfloat16 by an ``nn.Linear``'s bfloat16 weight through oneDNN, which first
reorders the weight into its blocked layout, on every call. For the one-row products of
generation that reorder costs more than the product itself, and with two threads it goes badly
wrong: on this project's 2-core AVX-512 BF16 machine the talker's 28 layers of projections took
0.4-1.2 s per pass that way, against 17 ms with the weights packed once (51 GB/s, memory bound)
and 27 ms through PyTorch's own non-oneDNN kernel. Packing is what ``torch.compile``'s CPU
backend does under freezing; here it is done eagerly, module by module.

The packed product is oneDNN's same inner-product kernel, so the numbers are bit-identical to
``nn.Linear``'s and the codes still equal qwen-tts' (the generation tests compare them against an
unpacked model). float32 weights are left alone: PyTorch sends those to MKL, which needs no
reorder, and the equivalence tests in float32 rest on that kernel's rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PackedLinear(nn.Module):
    """An ``nn.Linear`` with a bfloat16 weight held in oneDNN's packed layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The batch-size hint only picks the layout; products with more rows stay exact and fast.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def can_pack() -> bool:
    """oneDNN is built in and enabled (it is in PyTorch's x86 CPU wheels)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


@torch.no_grad()
def pack_linears(module: nn.Module) -> int:
    """Replace every bfloat16 ``nn.Linear`` under ``module`` (e.g. ``tts.model.talker``: its
    decoder layers, the code predictor's, their heads) with a ``PackedLinear``, in place; the
    unpacked weights are released. Returns how many were packed."""
    if not can_pack():
        return 0
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count

