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
position). The talker's multimodal rope gives text positions the same angle in all three
sections, so it is the ordinary rope here.

Tried and left out: fusing q/k/v and gate/up into single products (no measurable gain at batch 1
here, and the copies of memory-mapped weights doubled their resident memory); a hand-written
attention for one query (cheaper than SDPA's set-up, but it cannot round like SDPA's kernel, which
uses an approximate exp, so codes drift from qwen-tts' in bf16).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class DecoderStack:
    """The decoder layers and final norm of ``model`` (``talker.model`` or
    ``talker.code_predictor.model``) with a KV cache for one sequence of ``batch`` rows."""

    def __init__(self, model: Any, capacity: int, batch: int = 1) -> None:
        cfg = model.config
        self.layers = list(model.layers[: cfg.num_hidden_layers])
        self.norm = model.norm
        attention = self.layers[0].self_attn
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.inv_freq = model.rotary_emb.inv_freq.float()
        self.rope_scaling = model.rotary_emb.attention_scaling
        self.dtype = self.norm.weight.dtype
        self.length = 0  # positions cached so far
        shape = (len(self.layers), batch, self.n_kv_heads, max(capacity, 1), self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype)
        self.values = torch.zeros(shape, dtype=self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``x`` [batch, T, hidden], the positions after those cached, through the stack;
        cache them and return the normed hidden states [batch, T, hidden]."""
        start, steps = self.length, x.shape[1]
        end = start + steps
        if end > self.keys.shape[3]:
            self._grow(end)
        cos, sin = self._rope(start, end)
        for i, layer in enumerate(self.layers):
            x = x + self._attend(layer.self_attn, layer.input_layernorm(x), i, start, end, cos, sin)
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        self.length = end
        return self.norm(x)

    def _attend(self, attn: Any, h: torch.Tensor, i: int, start: int, end: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = h.shape
        q = attn.q_norm(attn.q_proj(h).view(batch, steps, self.n_heads, self.head_dim)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(batch, steps, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = attn.v_proj(h).view(batch, steps, self.n_kv_heads, self.head_dim).transpose(1, 2)
        self.keys[i, :, :, start:end] = k * cos + _rotate_half(k) * sin
        self.values[i, :, :, start:end] = v
        q = q * cos + _rotate_half(q) * sin
        # SDPA as transformers calls it: its CPU kernel's rounding (an approximate exp, bf16
        # probabilities) is part of what the equivalence with qwen-tts rests on.
        out = F.scaled_dot_product_attention(
            q, self.keys[i, :, :, :end], self.values[i, :, :, :end],
            is_causal=steps > 1, scale=self.scaling, enable_gqa=True,
        )
        return attn.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))

    def _rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        # As transformers computes it: angles in float32, cos/sin scaled, then cast to the dtype.
        angles = torch.arange(start, end, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.keys.shape[3])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
