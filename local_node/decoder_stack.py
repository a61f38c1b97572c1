"""A qwen-tts decoder stack (the talker's or the code predictor's) run step by step on its own weights.

Per generated frame the model runs 1 talker step and 15 code-predictor steps: 28 + 75 decoder
layers of matrix-vector products, where every microsecond outside the matmuls is paid 100 times.
Through the Hugging Face modules each step also builds masks, rotary tables for all positions,
a ``DynamicCache`` that concatenates keys and values, and several layers of keyword plumbing.
``DecoderStack`` keeps only the arithmetic, in the modules' own order and dtypes, so the results
are the same numbers (the generation tests compare codes with qwen-tts' frame for frame):

    per layer:  x + o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))  on input_layernorm(x)
                x + down(silu(gate(h)) * up(h))                             on post_attention_layernorm(x)
    then the final norm

Keys and values go into one preallocated buffer per stack that grows by doubling, so a step
writes in place instead of concatenating the whole history. Attention is PyTorch's SDPA with
grouped-query heads, as transformers calls it (causal over a fresh prompt, plain for one new
position). One new position, the common case, is one C call for all rows and heads, cache write
included (``cpu_kernels.attend_one``): in bfloat16 it reproduces SDPA's CPU kernel bit for bit
(its approximate exp, its sums and those of the MKL GEMM under it, found by probing them; checked
against SDPA at load for every length up to 512, beyond which SDPA does it), ~4x less time per
call than SDPA's per-head set-up. With int8 weights, whose numbers are off qwen-tts' anyway,
attention is in float32. The talker's multimodal rope gives text positions the same angle in
all three sections, so it is the ordinary rope here.

The layers come prepared (``packing.prepare_for_generation``): q/k/v and gate/up fused into one
product each, bfloat16 weights packed for oneDNN. q and k heads are normalised and rotated in one
go (one weight row per head), which is the same arithmetic element by element. In bfloat16 the
norms (and that rotation) are one C call each (``cpu_kernels.rms_norm``, ~2.4 against ~14 us for
the torch ops, 309 per frame), which rounds as the ops do; checked per size at load.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .int8 import Int8Linear

log = logging.getLogger(__name__)


class DecoderStack:
    """The decoder layers and final norm of ``model`` (``talker.model`` or
    ``talker.code_predictor.model``, prepared by ``packing.prepare_for_generation``) with a KV
    cache of ``batch`` rows, one sequence per row."""

    def __init__(self, model: Any, capacity: int, batch: int = 1) -> None:
        cfg = model.config
        self.layers = [_Layer(layer, cfg) for layer in model.layers[: cfg.num_hidden_layers]]
        self.final_norm = _norm_args(model.norm)
        self.head_dim = self.layers[0].head_dim
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.inv_freq = model.rotary_emb.inv_freq.float()
        self.rope_scaling = model.rotary_emb.attention_scaling
        self.dtype = model.norm.weight.dtype
        # The norms (and q and k's rotation) in one C call each where it rounds as PyTorch's ops.
        self.fused = self.dtype == torch.bfloat16 and all(map(_fused_norm_rounds_alike, {cfg.hidden_size, self.head_dim}))
        self._norm = cpu_kernels.rms_norm if self.fused else _rms_norm
        # int8 weights already move the numbers off qwen-tts', so attention need not round as
        # its bfloat16 SDPA does: keys and values are kept in float32, attended in float32.
        exact = not any(isinstance(layer.qkv, Int8Linear) for layer in self.layers)
        self.attention_dtype = self.dtype if exact else torch.float32
        # One new position attends in one C call (cache write included): in float32 for int8
        # models; in bfloat16 where the call rounds as SDPA does here (checked once per size).
        self.attend_in_c = self.fused and self.head_dim % 16 == 0 and self.head_dim <= 512 and (
            not exact or _c_attention_rounds_alike(self.head_dim))
        self.lengths = [0] * batch  # positions cached so far, per row
        shape = (len(self.layers), batch, self.n_kv_heads, max(capacity, 1), self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.attention_dtype)
        self.values = torch.zeros(shape, dtype=self.attention_dtype)

    def reset(self, row: int | None = None) -> None:
        """Forget the sequence in ``row`` (all rows if None)."""
        for r in range(len(self.lengths)) if row is None else (row,):
            self.lengths[r] = 0

    def forward(self, x: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Run ``x`` [n, T, hidden], row j continuing the sequence in cache row ``rows[j]`` (rows
        0..n-1 if None), through the stack; cache it and return the normed hidden states."""
        rows = list(range(x.shape[0])) if rows is None else list(rows)
        starts, steps = [self.lengths[r] for r in rows], x.shape[1]
        if max(starts) + steps > self.keys.shape[3]:
            self._grow(max(starts) + steps)
        cos, sin = self._rope(starts, steps)
        for i, layer in enumerate(self.layers):
            x = x + self._attend(layer, self._norm(x, *layer.input_norm), i, rows, starts, cos, sin)
            gate, up = layer.gate_up(self._norm(x, *layer.post_attention_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        for r in rows:
            self.lengths[r] += steps
        return self._norm(x, *self.final_norm)

    def _attend(self, layer: _Layer, h: torch.Tensor, i: int, rows: list[int], starts: list[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        n, steps, _ = h.shape
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        as_sdpa = self.attention_dtype == torch.bfloat16  # the C call then rounds as SDPA, up to its limit
        qkv = layer.qkv(h).unflatten(-1, (heads + 2 * kv_heads, dim))
        # q and k heads side by side, each with its own norm weight: one norm and one rotation
        # for both, the same arithmetic element by element.
        if self.fused:
            qk = cpu_kernels.rms_norm(qkv[:, :, : heads + kv_heads], *layer.qk_norm, cos, sin)
            if self.attend_in_c and steps == 1 and (not as_sdpa or max(starts) < cpu_kernels.MAX_EXACT_POSITIONS):
                v = qkv[:, :, heads + kv_heads :]
                return layer.o(cpu_kernels.attend_one(qk, v, self.keys[i], self.values[i], rows, starts, layer.scaling))
            qk = qk.transpose(1, 2)
        else:
            qk = _rms_norm(qkv[:, :, : heads + kv_heads], *layer.qk_norm).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk[:, :heads].to(self.attention_dtype), qk[:, heads:]
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        # SDPA as transformers calls it: its CPU kernel's rounding (an approximate exp, bf16
        # probabilities) is part of what the equivalence with qwen-tts rests on.
        if rows == list(range(rows[0], rows[0] + n)) and len(set(starts)) == 1:  # one block: one call
            first, start, end = rows[0], starts[0], starts[0] + steps
            self.keys[i, first : first + n, :, start:end] = k
            self.values[i, first : first + n, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q, self.keys[i, first : first + n, :, :end], self.values[i, first : first + n, :, :end],
                is_causal=steps > 1, scale=layer.scaling, enable_gqa=True,
            )
        else:  # sequences of different lengths: attention row by row
            outs = []
            for j, (row, start) in enumerate(zip(rows, starts)):
                end = start + steps
                self.keys[i, row, :, start:end] = k[j]
                self.values[i, row, :, start:end] = v[j]
                outs.append(F.scaled_dot_product_attention(
                    q[j : j + 1], self.keys[i, row : row + 1, :, :end], self.values[i, row : row + 1, :, :end],
                    is_causal=steps > 1, scale=layer.scaling, enable_gqa=True,
                ))
            out = torch.cat(outs)
        return layer.o(out.transpose(1, 2).reshape(n, steps, -1).to(h.dtype))

    def _rope(self, starts: list[int], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, 1, T, head_dim] for each row's next T positions. As transformers
        computes them: angles in float32, cos/sin scaled, then cast to the dtype."""
        positions = torch.tensor(starts, dtype=torch.float32)[:, None] + torch.arange(steps, dtype=torch.float32)
        angles = positions[..., None] * self.inv_freq
        emb = torch.cat((angles, angles), dim=-1)[:, None]
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.keys.shape[3])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)


class _Layer:
    """What a step needs of one Hugging Face decoder layer, looked up once."""

    def __init__(self, layer: Any, cfg: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj"):
            raise ValueError("the model's decoder layers are not prepared: call packing.prepare_for_generation first")
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.qkv, self.o, self.gate_up, self.down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
        self.input_norm = _norm_args(layer.input_layernorm)
        self.post_attention_norm = _norm_args(layer.post_attention_layernorm)
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        q_norm, k_norm = attn.q_norm, attn.k_norm
        if q_norm.variance_epsilon != k_norm.variance_epsilon:
            raise NotImplementedError("q_norm and k_norm with different epsilons")
        weight = torch.cat([q_norm.weight.expand(heads, -1), k_norm.weight.expand(kv_heads, -1)])  # [heads, dim]
        self.qk_norm = (weight, q_norm.variance_epsilon)


def _norm_args(norm: Any) -> tuple[torch.Tensor, float]:
    return norm.weight, norm.variance_epsilon


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3TTSRMSNorm's forward, op for op (so the same rounding), without the module call."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@functools.cache
def _fused_norm_rounds_alike(dim: int) -> bool:
    """Whether ``cpu_kernels.rms_norm`` gives ``_rms_norm``'s numbers bit for bit on rows of
    ``dim``. Its sum copies the order of PyTorch's CPU kernel (8-float vectors on this build),
    which another build or CPU may change, so that order is checked once per size on the float
    sums themselves (a sum one ulp off rarely shows after rounding to bfloat16), then the norm."""
    if not cpu_kernels.available() or not 8 <= dim <= 4096:
        return False
    generator = torch.Generator().manual_seed(dim)
    x = (torch.randn(64, dim, generator=generator) * torch.rand(64, 1, generator=generator) * 30).to(torch.bfloat16)
    squares = x.float().pow(2)
    if not torch.equal(cpu_kernels.row_sums(squares), squares.sum(-1)):
        return False
    weight = (torch.randn(dim, generator=generator) * 0.5 + 1).to(torch.bfloat16)
    return torch.equal(cpu_kernels.rms_norm(x, weight, 1e-6), _rms_norm(x, weight, 1e-6))


@functools.cache
def _c_attention_rounds_alike(dim: int) -> bool:
    """Whether ``cpu_kernels.attend_one`` on bfloat16 caches gives SDPA's numbers bit for bit here,
    at every length it takes. It copies the sums of PyTorch's CPU kernel and of the MKL GEMM under
    it, which another build or CPU may order otherwise; so three sequences are attended step by
    step as in generation (between them every length up to the limit), on ordinary values and on
    values of wide exponents and signs, each order of summation leaving its own rounding."""
    if not cpu_kernels.available():
        return False
    generator = torch.Generator().manual_seed(dim)
    heads, firsts = 8, [0, 100, 300]  # query heads share a kv head, as in the models; more sums to compare
    steps = cpu_kernels.MAX_EXACT_POSITIONS - firsts[-1]
    exponents = torch.randint(0, 8, (steps, 3, 1, heads + 2, dim), generator=generator).float()
    signs = torch.randint(0, 2, exponents.shape, generator=generator) * 2 - 1
    wide = ((torch.rand(exponents.shape, generator=generator) + 1) * 2**exponents * signs).to(torch.bfloat16)
    ordinary = (torch.randn(exponents.shape, generator=generator) * 2).to(torch.bfloat16)
    for qkv, scale in ((wide, 1e-4), (ordinary, dim**-0.5)):
        keys, values = (torch.randn(3, 1, cpu_kernels.MAX_EXACT_POSITIONS, dim, generator=generator).to(torch.bfloat16)
                        for _ in range(2))
        for t in range(steps):
            starts = [first + t for first in firsts]
            got = cpu_kernels.attend_one(qkv[t, :, :, : heads + 1].contiguous(), qkv[t, :, :, heads + 1 :], keys, values,
                                         [0, 1, 2], starts, scale)
            for row, start in enumerate(starts):
                want = F.scaled_dot_product_attention(qkv[t, row : row + 1, :, :heads].transpose(1, 2),
                                                      keys[row : row + 1, :, : start + 1], values[row : row + 1, :, : start + 1],
                                                      scale=scale, enable_gqa=True)
                if not torch.equal(got[row], want.transpose(1, 2).reshape(1, -1)):
                    log.info("attention stays with SDPA: the C call rounds otherwise here (length %d)", start + 1)
                    return False
    return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
