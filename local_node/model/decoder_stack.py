"""A qwen-tts decoder stack (the talker's or the code predictor's) run step by step on its own weights.

Per generated frame the model runs 1 talker step and 15 code-predictor steps: 28 + 75 decoder
layers of matrix-vector products, where every microsecond outside the matmuls is paid 100 times.
Through the Hugging Face modules each step also builds masks, rotary tables for all positions,
a ``DynamicCache`` that concatenates keys and values, and several layers of keyword plumbing.
``DecoderStack`` keeps only the arithmetic, in the modules' own order and dtypes (the generation
tests compare its codes with qwen-tts' frame for frame in float32, and its logits in bfloat16):

    per layer:  x + o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))  on input_layernorm(x)
                x + down(silu(gate(h)) * up(h))                             on post_attention_layernorm(x)
    then the final norm

Keys and values go into one preallocated buffer per stack that grows by doubling, so a step
writes in place instead of concatenating the whole history.

Where the node's kernels run (``cpu_kernels``; the stack uses the ones its weights were laid out
for, so a bfloat16 model), one new position, the common case, goes through every layer in one C
call (``Kernels.stack_step``): the products, norms, rotation, attention (float32 over the
bfloat16 cache, cache write included) and the adds and SiLU between them, for all rows at once,
instead of a dozen dispatches from Python per layer. Prompts (several new positions) go layer by
layer: the norms and the q/k rotation in C, attention through PyTorch's SDPA with grouped-query
heads, as transformers calls it (causal); everything does where our kernels do not run (float32
models, ``portable``). The talker's multimodal rope gives
text positions the same angle in all three sections, so it is the ordinary rope here.

The layers come prepared (``packing.prepare_for_generation``): q/k/v and gate/up fused into one
product each. q and k heads are normalised and rotated in one go (one weight row per head), which
is the same arithmetic element by element.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from local_node.kernels import cpu_kernels


class DecoderStack:
    """The decoder layers and final norm of ``model`` (``talker.model`` or
    ``talker.code_predictor.model``, prepared by ``packing.prepare_for_generation``) with a KV
    cache of ``batch`` rows, one sequence per row. ``own_ops=False`` keeps PyTorch's ops for the
    norms and attention even where the kernels run (for comparing the two)."""

    def __init__(self, model: Any, capacity: int, batch: int = 1, own_ops: bool = True) -> None:
        cfg = model.config
        self.layers = [_Layer(layer, cfg) for layer in model.layers[: cfg.num_hidden_layers]]
        self.final_norm = _norm_args(model.norm)
        self.head_dim = self.layers[0].head_dim
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.inv_freq = model.rotary_emb.inv_freq.float()
        self.rope_scaling = model.rotary_emb.attention_scaling
        self.dtype = model.norm.weight.dtype
        # The kernels the weights were laid out for: norms and one-position attention too.
        self.kernels: cpu_kernels.Kernels | None = getattr(self.layers[0].qkv, "kernels", None)
        if self.kernels is not None and (
            not own_ops or self.dtype != torch.bfloat16 or self.head_dim % 16 or max(self.head_dim, cfg.hidden_size) > cpu_kernels.MAX_DIM
        ):
            self.kernels = None
        self._norm = _rms_norm if self.kernels is None else self.kernels.rms_norm
        # One new position through every layer in one C call, where all the products are ours.
        self._table = None if self.kernels is None else self.kernels.layer_table([layer.parts() for layer in self.layers])
        self.intermediate = self.layers[0].gate_up.out_features // 2
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
        if self._table is not None and steps == 1:
            x = self.kernels.stack_step(
                self._table, x, self.n_heads, self.n_kv_heads, self.intermediate, self.keys, self.values, rows, starts, cos, sin
            )
        else:
            for i, layer in enumerate(self.layers):
                x = x + self._attend(layer, self._norm(x, *layer.input_norm), i, rows, starts, cos, sin)
                gate, up = layer.gate_up(self._norm(x, *layer.post_attention_norm)).chunk(2, dim=-1)
                x = x + layer.down(F.silu(gate) * up)
        for r in rows:
            self.lengths[r] += steps
        return self._norm(x, *self.final_norm)

    def _attend(
        self, layer: _Layer, h: torch.Tensor, i: int, rows: list[int], starts: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Self-attention of layer ``i`` for ``h`` [n, steps, hidden], its keys and values cached.
        Three paths: our kernels for one new position (a generation step), our kernels' norm and
        rotation then SDPA for several (a prompt), PyTorch alone without our kernels."""
        qkv = layer.qkv(h).unflatten(-1, (self.n_heads + 2 * self.n_kv_heads, self.head_dim))
        one_position = h.shape[1] == 1
        if self.kernels is None:
            out = self._attend_in_torch(layer, qkv, i, rows, starts, cos, sin)
        elif one_position:
            out = self._attend_one(layer, qkv, i, rows, starts, cos, sin)
        else:
            out = self._attend_prompt(layer, qkv, i, rows, starts, cos, sin)
        return layer.o(out)

    # q and k heads sit side by side in qkv, each with its own norm weight: one norm and one
    # rotation for both, the same arithmetic element by element.

    def _attend_one(
        self, layer: _Layer, qkv: torch.Tensor, i: int, rows: list[int], starts: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        assert self.kernels is not None
        qk = self.kernels.rms_norm(qkv[:, :, : self.n_heads + self.n_kv_heads], *layer.qk_norm, cos, sin)
        v = qkv[:, :, self.n_heads + self.n_kv_heads :]
        return self.kernels.attend_one(qk, v, self.keys[i], self.values[i], rows, starts, layer.scaling)

    def _attend_prompt(
        self, layer: _Layer, qkv: torch.Tensor, i: int, rows: list[int], starts: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        assert self.kernels is not None
        qk = self.kernels.rms_norm(qkv[:, :, : self.n_heads + self.n_kv_heads], *layer.qk_norm, cos, sin).transpose(1, 2)
        return self._sdpa(layer, i, qk, qkv[:, :, self.n_heads + self.n_kv_heads :].transpose(1, 2), rows, starts)

    def _attend_in_torch(
        self, layer: _Layer, qkv: torch.Tensor, i: int, rows: list[int], starts: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        qk = _rms_norm(qkv[:, :, : self.n_heads + self.n_kv_heads], *layer.qk_norm).transpose(1, 2)
        qk = qk * cos + _rotate_half(qk) * sin
        return self._sdpa(layer, i, qk, qkv[:, :, self.n_heads + self.n_kv_heads :].transpose(1, 2), rows, starts)

    def _sdpa(self, layer: _Layer, i: int, qk: torch.Tensor, v: torch.Tensor, rows: list[int], starts: list[int]) -> torch.Tensor:
        """PyTorch's SDPA as transformers calls it: write the new keys and values ([n, heads,
        steps, dim]) into the cache, attend (causally over several new positions); [n, steps,
        heads * dim]."""
        n, _, steps, _ = qk.shape
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        if rows == list(range(rows[0], rows[0] + n)) and len(set(starts)) == 1:  # one block: one call
            first, start, end = rows[0], starts[0], starts[0] + steps
            self.keys[i, first : first + n, :, start:end] = k
            self.values[i, first : first + n, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i, first : first + n, :, :end],
                self.values[i, first : first + n, :, :end],
                is_causal=steps > 1,
                scale=layer.scaling,
                enable_gqa=True,
            )
        else:  # sequences of different lengths: attention row by row
            outs = []
            for j, (row, start) in enumerate(zip(rows, starts)):
                end = start + steps
                self.keys[i, row, :, start:end] = k[j]
                self.values[i, row, :, start:end] = v[j]
                outs.append(
                    F.scaled_dot_product_attention(
                        q[j : j + 1],
                        self.keys[i, row : row + 1, :, :end],
                        self.values[i, row : row + 1, :, :end],
                        is_causal=steps > 1,
                        scale=layer.scaling,
                        enable_gqa=True,
                    )
                )
            out = torch.cat(outs)
        return out.transpose(1, 2).reshape(n, steps, -1)

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

    def parts(self) -> dict[str, Any]:
        """What ``Kernels.layer_table`` reads."""
        if self.input_norm[1] != self.post_attention_norm[1]:
            raise NotImplementedError("input and post-attention norms with different epsilons")
        return dict(
            qkv=self.qkv,
            o=self.o,
            gate_up=self.gate_up,
            down=self.down,
            input_norm=self.input_norm[0],
            post_norm=self.post_attention_norm[0],
            qk_norm=self.qk_norm[0],
            norm_eps=self.input_norm[1],
            qk_eps=self.qk_norm[1],
            scale=self.scaling,
        )


def _norm_args(norm: Any) -> tuple[torch.Tensor, float]:
    return norm.weight, norm.variance_epsilon


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3TTSRMSNorm's forward, op for op (so the same rounding), without the module call."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
