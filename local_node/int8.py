"""Opt-in int8 weights: ``weights: int8`` on a model in the node's YAML.

At batch 1 a frame reads every weight of the talker once and of the code predictor 15 times, so
the bytes read set the pace. Here the projections of every decoder layer (talker and code
predictor: attention q/k/v/o and the MLP, nearly all the bytes read per frame) are stored as int8
with one scale per output row, symmetric. Embeddings, norms, the output heads and the codec stay
as they are.

The products: on CPUs with AVX-512 BF16, with bfloat16 activations, ``int8_kernel.c`` (built
here with the system's C compiler on first use, cached in ``~/.cache/qwen3-tts-node``), which
reads the int8 weights at nearly the memory's speed; elsewhere, or without a compiler, PyTorch's
weight-only int8 kernel (``_weight_int8pack_mm``), which is compute-bound and on such a CPU no
faster than bfloat16 (it still halves the memory). Both compute bf16(scale * sum(x * w)) with
float32 sums; the tests hold them to each other.

It changes the numbers: codes no longer equal qwen-tts' and the voice may drift. ``./bench.sh``
reports how far the logits move (KL divergence per frame against the unquantised model). Off by
default until judged by ear on real weights.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("int8_kernel.c")
KERNEL_FLAGS = ("-O3", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` with int8 weights and a scale per output row; ``kernel=False``
    keeps PyTorch's kernel even where ours would run."""

    def __init__(self, linear: nn.Linear, kernel: bool = True) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free projections")
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(linear.weight.dtype)
        quantized = (weight / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.product = _blocked_product(quantized) if kernel and linear.weight.dtype == torch.bfloat16 else None
        # With our kernel the weight is kept in its blocked layout (int8_kernel.c), scales in float32.
        self.register_buffer("weight", quantized if self.product is None else _blocked(quantized, _rows()))
        self.register_buffer("scale", scale if self.product is None else scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # both kernels take 2-D inputs
        if self.product is not None and x.dtype == torch.bfloat16:
            out = self.product(rows.contiguous(), self.weight, self.scale)
        else:
            out = torch._weight_int8pack_mm(rows, self.weight, self.scale)
        return out.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize_int8(model: Any) -> int:
    """Replace the projections of every talker and code-predictor layer of ``model`` (a
    Qwen3TTSForConditionalGeneration) with ``Int8Linear``, in place. Returns how many."""
    talker = model.talker
    count = 0
    for layer in (*talker.model.layers, *talker.code_predictor.model.layers):
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(block, name, Int8Linear(child))
                    count += 1
    return count


def kernel_available() -> bool:
    """Whether ``int8_kernel.c`` runs here: a CPU with AVX-512 BF16 and a C compiler that built it."""
    return _kernel() is not None


def _blocked_product(weight: torch.Tensor) -> Callable | None:
    """Our kernel's product for an int8 weight [N, K], or None where it cannot run."""
    kernel = _kernel()
    n, k = weight.shape
    if kernel is None or n % _rows() or k % 32:
        return None

    def product(x: torch.Tensor, blocked: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        kernel(x.data_ptr(), blocked.data_ptr(), scale.data_ptr(), out.data_ptr(), x.shape[0], n, k)
        return out

    return product


def _blocked(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, K] -> the kernel's layout: per block of ``rows`` rows, per 32 columns, rows x 32 contiguous."""
    n, k = weight.shape
    return weight.view(n // rows, rows, k // 32, 32).transpose(1, 2).contiguous().view(n, k)


def _rows() -> int:
    return _library().q8_rows()


@functools.cache
def _kernel() -> Any:
    """``q8_linear`` from the built kernel, or None. ctypes releases the GIL during the call, so
    the node's generation and decoding threads still run side by side."""
    if not (platform.machine().lower() in ("x86_64", "amd64") and torch.cpu._is_avx512_bf16_supported()):
        return None
    try:
        library = _library()
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("int8 weights: could not build %s (%s); using PyTorch's slower int8 kernel", KERNEL_SOURCE.name, e)
        return None
    function = library.q8_linear
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    function.restype = None
    return function


@functools.cache
def _library() -> ctypes.CDLL:
    """Compile ``int8_kernel.c`` once per source and flags (a second or so) and load it."""
    compiler = os.environ.get("CC", "cc")
    source = KERNEL_SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *KERNEL_FLAGS)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-tts-node"
    built = cache / f"int8_kernel-{digest}.so"
    if not built.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:  # then renamed: other processes see it whole
            partial = Path(scratch) / built.name
            subprocess.run([compiler, *KERNEL_FLAGS, str(KERNEL_SOURCE), "-o", str(partial)],
                           check=True, capture_output=True, timeout=120)
            os.replace(partial, built)
    return ctypes.CDLL(str(built))
