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

from typing import Any, Sequence

import torch
import torch.nn.functional as F


class DecoderStack:
    """The decoder layers and final norm of ``model`` (``talker.model`` or
    ``talker.code_predictor.model``) with a KV cache of ``batch`` rows, one sequence per row."""

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
        self.lengths = [0] * batch  # positions cached so far, per row
        shape = (len(self.layers), batch, self.n_kv_heads, max(capacity, 1), self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype)
        self.values = torch.zeros(shape, dtype=self.dtype)

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
            x = x + self._attend(layer.self_attn, layer.input_layernorm(x), i, rows, starts, cos, sin)
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        for r in rows:
            self.lengths[r] += steps
        return self.norm(x)

    def _attend(self, attn: Any, h: torch.Tensor, i: int, rows: list[int], starts: list[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        n, steps, _ = h.shape
        q = attn.q_norm(attn.q_proj(h).view(n, steps, self.n_heads, self.head_dim)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(n, steps, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = attn.v_proj(h).view(n, steps, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k = k * cos + _rotate_half(k) * sin
        q = q * cos + _rotate_half(q) * sin
        # SDPA as transformers calls it: its CPU kernel's rounding (an approximate exp, bf16
        # probabilities) is part of what the equivalence with qwen-tts rests on.
        if rows == list(range(rows[0], rows[0] + n)) and len(set(starts)) == 1:  # one block: one call
            first, start, end = rows[0], starts[0], starts[0] + steps
            self.keys[i, first : first + n, :, start:end] = k
            self.values[i, first : first + n, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q, self.keys[i, first : first + n, :, :end], self.values[i, first : first + n, :, :end],
                is_causal=steps > 1, scale=self.scaling, enable_gqa=True,
            )
        else:  # sequences of different lengths: attention row by row
            outs = []
            for j, (row, start) in enumerate(zip(rows, starts)):
                end = start + steps
                self.keys[i, row, :, start:end] = k[j]
                self.values[i, row, :, start:end] = v[j]
                outs.append(F.scaled_dot_product_attention(
                    q[j : j + 1], self.keys[i, row : row + 1, :, :end], self.values[i, row : row + 1, :, :end],
                    is_causal=steps > 1, scale=self.scaling, enable_gqa=True,
                ))
            out = torch.cat(outs)
        return attn.o_proj(out.transpose(1, 2).reshape(n, steps, -1))

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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
