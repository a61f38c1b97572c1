"""Incremental decoding of the Qwen3-TTS 12 Hz speech codec, for streaming audio out while the
talker is still generating codec frames.

One frame is ``num_quantizers`` (16) codebook ids and decodes to ``decode_upsample_rate`` (1920)
samples at 24 kHz. ``StreamingDecoder`` takes frames one at a time and hands back PCM in chunks
whose sizes follow a schedule: a small first chunk for latency, larger ones for throughput.

How: the codec decoder is causal end to end (causal convolutions, transposed convolutions trimmed
on the right, causal sliding-window attention), so it can carry state instead of re-decoding
context. Each chunk runs only its new frames through the decoder's own modules:

* the quantizer is per frame and needs no state;
* the transformer runs with a ``DynamicCache`` (sliding-window KV cache, exactly the keys the
  sliding mask lets each query see);
* every stride-1 causal module (``pre_conv``, the ConvNeXt blocks, the residual units, the first
  and last convolutions) keeps its last ``R`` input samples, ``R`` being its causal look-back
  (sum of its convolutions' left padding); it is called unmodified on ``history + new`` and the
  first ``R`` outputs, which saw its zero padding, are dropped;
* each causal transposed convolution runs as one matrix product and an overlap-add, carrying
  the partial sums of the outputs that the next samples still add to;
* the point-wise SnakeBeta activations need nothing.

That is the whole-utterance computation, reordered: the same samples come out, up to
floating-point rounding (the kernels see other lengths), which the tests bound.

The whole-utterance reference, ``Qwen3TTSTokenizer.decode``, itself decodes in pieces
(``chunked_decode``: 300 frames, restarting with 25 frames of left context). So the stream
restarts its state at the same frames, warmed on the same 25 frames of context, and matches
utterances of any length. Warming (also used by ``prime`` for a voice-clone reference) runs the
cheap part (quantizer, ``pre_conv``, transformer) on all the context frames, but the expensive
upsampling stack only on as many trailing frames as its finite receptive field needs.

Receptive field, for the record: the upsampling stack after the transformer reaches 10 frames
back (derived from its kernels below; an impulse measures 9.3), ``pre_conv`` 2 frames, and the
transformer 8 layers x 71 frames (sliding window 72), so re-decoding with left context instead
of carrying state would need ~580 frames to be exact. Position ids stay those of the whole decode
(RoPE tables are float32, so shifted positions alone would differ at float32 rounding).

Cost: the real-shape codec is ~5 GFLOP per frame, bound by arithmetic; streamed in chunks it is
faster than one whole-utterance pass, whose 24 kHz activations do not fit in cache. bfloat16
convolutions have no fast kernel on CPUs without AVX-512 BF16 or AMX: run the codec in float32
there (``codec_dtype: auto`` does). BENCHMARKS.md has what decoding adds per frame.
"""

from __future__ import annotations

import collections
import inspect
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from local_node.model.qwen_import import import_qwen_tts

__all__ = ["StreamingDecoder"]


def _qwen_classes() -> Any:
    import_qwen_tts()
    from qwen_tts.core.tokenizer_12hz import modeling_qwen3_tts_tokenizer_v2 as m

    return m


def _find_decoder(speech_tokenizer: Any) -> nn.Module:
    """The ``Qwen3TTSTokenizerV2Decoder`` inside ``speech_tokenizer``.

    Takes the ``Qwen3TTSTokenizer`` wrapper (``tts.model.speech_tokenizer``), the
    ``Qwen3TTSTokenizerV2Model`` it wraps, or the decoder itself.
    """
    m = _qwen_classes()
    for candidate in (
        speech_tokenizer,
        getattr(speech_tokenizer, "decoder", None),
        getattr(getattr(speech_tokenizer, "model", None), "decoder", None),
    ):
        if isinstance(candidate, m.Qwen3TTSTokenizerV2Decoder):
            return candidate
    raise TypeError(
        "expected a 12 Hz Qwen3TTSTokenizer (tts.model.speech_tokenizer), its "
        f"Qwen3TTSTokenizerV2Model or its decoder, not {type(speech_tokenizer).__name__}"
    )


def _reference_chunking(decoder: nn.Module) -> tuple[int, int]:
    """(chunk_size, left_context_size) that ``Qwen3TTSTokenizerV2Model.decode`` decodes with.

    ``decode`` calls ``chunked_decode(codes)`` with its defaults, so read them from there.
    """
    params = inspect.signature(decoder.chunked_decode).parameters
    return int(params["chunk_size"].default), int(params["left_context_size"].default)


@dataclass(frozen=True)
class _Step:
    """One leaf module of the stack after the decoder's transformer, and how it streams."""

    kind: Literal["pointwise", "history", "transconv"]  # no state; a causal conv's last inputs; a transposed conv's overlap
    module: nn.Module
    lookback: int = 0  # history: the input samples it looks back


class _Plan:
    """How to stream each module of the decoder's convolutional part, checked once up front."""

    def __init__(self, decoder: nn.Module) -> None:
        m = _qwen_classes()
        self._m = m
        self.pre_conv_lookback = self._causal_lookback(decoder.pre_conv)
        # The stack after the transformer, flattened into a sequence of leaf steps.
        self.steps: list[_Step] = []
        for blocks in decoder.upsample:
            self._add(blocks)
        self._add(decoder.decoder)
        # Frames of transformer output the stack needs, from a zero state, for its state to be
        # exact: its receptive field, walked back from the output.
        need = 0
        for step in reversed(self.steps):
            if step.kind == "history":
                need += step.lookback
            elif step.kind == "transconv":
                k, s = step.module.conv.kernel_size[0], step.module.conv.stride[0]
                need = (need + k - 1) // s
        self.steps_lookback_frames = need

    def _causal_lookback(self, module: nn.Module) -> int:
        """Input samples a stride-1 causal module looks back: its convolutions' left padding."""
        convs = [c for c in module.modules() if isinstance(c, self._m.Qwen3TTSTokenizerV2CausalConvNet)]
        for conv in convs:
            if conv.stride != 1 or conv.padding != conv.kernel_size - 1:
                raise NotImplementedError(f"cannot stream a strided causal conv: {conv}")
        return sum(c.padding for c in convs)

    def _add(self, module: nn.Module) -> None:
        m = self._m
        if isinstance(module, nn.ModuleList):
            for child in module:
                self._add(child)
        elif isinstance(module, m.Qwen3TTSTokenizerV2DecoderDecoderBlock):
            self._add(module.block)
        elif isinstance(module, m.SnakeBeta):
            self.steps.append(_Step("pointwise", module))
        elif isinstance(
            module,
            (
                m.Qwen3TTSTokenizerV2CausalConvNet,
                m.Qwen3TTSTokenizerV2ConvNeXtBlock,
                m.Qwen3TTSTokenizerV2DecoderDecoderResidualUnit,
            ),
        ):
            self.steps.append(_Step("history", module, self._causal_lookback(module)))
        elif isinstance(module, m.Qwen3TTSTokenizerV2CausalTransConvNet):
            conv = module.conv
            k, s = conv.kernel_size[0], conv.stride[0]
            if (
                conv.padding != (0,)
                or conv.output_padding != (0,)
                or conv.dilation != (1,)
                or conv.groups != 1
                or k % s
                or module.left_pad != 0
                or module.right_pad != k - s
            ):
                raise NotImplementedError(f"cannot stream this transposed conv: {module}")
            self.steps.append(_Step("transconv", module))
        else:
            raise NotImplementedError(f"no streaming rule for {type(module).__name__}")


class _State:
    """Everything carried between chunks of one decoding pass."""

    def __init__(self, decoder: nn.Module, plan: _Plan) -> None:
        from transformers.cache_utils import DynamicCache

        # The last input samples of pre_conv, and of each step of the upsampling stack.
        self.pre_conv: torch.Tensor | None = None
        self.steps: list[torch.Tensor | None] = [None] * len(plan.steps)
        # Sliding-window layers: they keep the last sliding_window - 1 keys and values.
        self.kv = DynamicCache(config=decoder.pre_transformer.config)


class StreamingDecoder:
    """Decode 12 Hz codec frames as they arrive.

    ``push`` one frame at a time; when ``schedule[i]`` frames have gathered (the last schedule
    value repeating), they are decoded and their PCM returned. ``flush`` decodes what is left and
    ends the utterance; the decoder is then ready for the next one. All PCM returned for an
    utterance, concatenated, is ``speech_tokenizer.decode`` of all its frames, up to
    floating-point rounding.

    ``prime(codes)`` may start an utterance with frames whose audio is not wanted (a voice-clone
    reference the talker continues from); the pushed frames then decode as they would after it.

    Not thread-safe; use one per concurrent stream (they can share the model).
    """

    def __init__(self, speech_tokenizer: Any, schedule: Sequence[int] = (1, 4, 8, 16)) -> None:
        schedule = tuple(int(n) for n in schedule)
        if not schedule or any(n < 1 for n in schedule):
            raise ValueError(f"schedule must be a non-empty sequence of positive ints: {schedule}")
        self.schedule = schedule
        self._decoder = _find_decoder(speech_tokenizer)
        config = self._decoder.config
        self.num_quantizers = int(config.num_quantizers)
        self.codebook_size = int(config.codebook_size)
        self.samples_per_frame = int(self._decoder.total_upsample)
        self._plan = _Plan(self._decoder)
        self._restart_every, self._restart_context = _reference_chunking(self._decoder)
        param = next(self._decoder.parameters())
        self._device = param.device
        self._reset()

    # ------------------------------------------------------------------ public

    def push(self, frame_codes: torch.Tensor) -> np.ndarray | None:
        """Add one frame (``num_quantizers`` codebook ids); return PCM if a chunk is complete."""
        frame = self._check_frames(frame_codes, single=True)
        self._pending.append(frame[0])
        if len(self._pending) < self.schedule[min(self._chunks, len(self.schedule) - 1)]:
            return None
        return self._emit()

    def flush(self) -> np.ndarray:
        """Decode the frames still pending, end the utterance and return their PCM."""
        pcm = self._emit() if self._pending else np.zeros(0, dtype=np.float32)
        self._reset()
        return pcm

    def prime(self, codes: torch.Tensor) -> None:
        """Start the utterance with ``codes`` ([frames, num_quantizers]) decoded but not returned.

        For the voice-clone path, which decodes the reference's codes in front of the generated
        ones and cuts their audio off. Only the transformer sees all of them; the upsampling
        stack runs on the last few frames only, so priming is cheap.
        """
        if self._frames or self._pending:
            raise RuntimeError("prime() must come before the first push() of an utterance")
        frames = self._check_frames(codes, single=False)
        if len(frames):
            with torch.inference_mode():
                self._advance(frames, want_audio=False)

    @property
    def pending_frames(self) -> int:
        """Frames pushed but not decoded yet."""
        return len(self._pending)

    # ------------------------------------------------------------------ internals

    def _reset(self) -> None:
        self._state = _State(self._decoder, self._plan)
        self._pending: list[torch.Tensor] = []
        self._chunks = 0  # chunks returned so far in this utterance
        self._frames = 0  # frames decoded (or primed) so far in this utterance
        # The frames a restart of the reference's chunking warms up on.
        self._recent: collections.deque[torch.Tensor] = collections.deque(maxlen=self._restart_context)

    def _check_frames(self, codes: Any, *, single: bool) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codec ids must be integers, not {codes.dtype}")
        if single:
            if codes.shape != (self.num_quantizers,):
                raise ValueError(f"expected one frame of shape ({self.num_quantizers},), got {tuple(codes.shape)}")
            codes = codes[None]
        elif codes.dim() != 2 or codes.shape[1] != self.num_quantizers:
            raise ValueError(f"expected codes of shape (frames, {self.num_quantizers}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codec ids must be in [0, {self.codebook_size})")
        return codes.to(device=self._device, dtype=torch.long)

    def _emit(self) -> np.ndarray:
        frames = torch.stack(self._pending)
        self._pending = []
        self._chunks += 1
        with torch.inference_mode():
            wav = self._advance(frames, want_audio=True)
        return wav.to(torch.float32).cpu().numpy()

    def _advance(self, frames: torch.Tensor, *, want_audio: bool) -> torch.Tensor:
        """Decode ``frames`` after those already seen, restarting where the reference does."""
        pieces = []
        start = 0
        while start < len(frames):
            if self._frames and self._frames % self._restart_every == 0:
                self._restart()
            room = self._restart_every - self._frames % self._restart_every
            piece = frames[start : start + room]
            out = self._step(piece, self._state, want_audio=want_audio)
            if want_audio:
                pieces.append(out)
            self._recent.extend(piece)
            self._frames += len(piece)
            start += len(piece)
        if not want_audio:
            return torch.zeros(0)
        return torch.cat(pieces)

    def _restart(self) -> None:
        """Begin a new reference chunk: fresh state, warmed on the preceding context frames."""
        self._state = _State(self._decoder, self._plan)
        if self._recent:
            self._warm(torch.stack(list(self._recent)), self._state)

    def _warm(self, frames: torch.Tensor, state: _State) -> None:
        """Bring a fresh ``state`` to where decoding ``frames`` would leave it, cheaply."""
        hidden = self._front(frames, state)
        tail = self._plan.steps_lookback_frames + 1
        self._back(hidden[..., -tail:], state)

    def _step(self, frames: torch.Tensor, state: _State, *, want_audio: bool) -> torch.Tensor:
        if not want_audio:
            self._warm(frames, state)
            return torch.zeros(0)
        wav = self._back(self._front(frames, state), state)
        return wav.clamp(min=-1, max=1)[0, 0]  # as Qwen3TTSTokenizerV2Decoder.forward

    def _front(self, frames: torch.Tensor, state: _State) -> torch.Tensor:
        """Codes [T, Q] -> transformer output [1, latent, T]."""
        decoder = self._decoder
        hidden = decoder.quantizer.decode(frames.T[None])  # per frame, no state
        hidden, state.pre_conv = _causal_call(decoder.pre_conv, hidden, state.pre_conv, self._plan.pre_conv_lookback)
        hidden = decoder.pre_transformer(inputs_embeds=hidden.transpose(1, 2), past_key_values=state.kv, use_cache=True).last_hidden_state
        return hidden.transpose(1, 2)

    def _back(self, hidden: torch.Tensor, state: _State) -> torch.Tensor:
        """Transformer output [1, latent, T] -> waveform [1, 1, T * samples_per_frame]."""
        for i, step in enumerate(self._plan.steps):
            if step.kind == "pointwise":
                hidden = step.module(hidden)
            elif step.kind == "transconv":
                hidden, state.steps[i] = _transposed_call(step.module.conv, hidden, state.steps[i])
            else:
                hidden, state.steps[i] = _causal_call(step.module, hidden, state.steps[i], step.lookback)
        return hidden


def _causal_call(module: nn.Module, x: torch.Tensor, history: torch.Tensor | None, keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a causal stride-1 ``module`` on new input samples ``x`` that follow ``history``.

    The module is called unmodified on ``history + x``; the outputs of the history samples,
    which also saw the module's own zero padding, are dropped. Returns the outputs for ``x`` and
    the last ``keep`` input samples, the next call's history. A history shorter than ``keep``
    only happens at the start, where the zero padding is right.
    """
    old = 0
    if history is not None:
        old = history.shape[-1]
        x = torch.cat([history, x], dim=-1)
    # clone: do not keep the whole chunk alive through a view
    new_history = x[..., -keep:].clone() if keep else None
    return module(x)[..., old:], new_history


def _transposed_call(conv: nn.ConvTranspose1d, x: torch.Tensor, carry: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal transposed convolution (kernel ``m * s``, stride ``s``, the last ``k - s``
    outputs trimmed) on new input samples ``x`` [1, C_in, T], by overlap-add.

    Each input sample adds ``W^T x_t`` to ``k`` outputs starting at ``t * s``: one matrix product
    for the chunk, then ``m`` shifted adds. The first ``T * s`` outputs are final; the ``k - s``
    after them still await the next samples' contributions and are carried. Not calling the
    module matters: PyTorch's CPU transposed convolution repacks its weights on every call,
    which for the 1536-channel upsampler costs tens of milliseconds even for one frame.
    Sums are kept in at least float32, like the convolution's own accumulator.
    """
    c_in, c_out, k = conv.weight.shape
    s = conv.stride[0]
    m, t = k // s, x.shape[-1]
    taps = torch.mm(x[0].T, conv.weight.reshape(c_in, c_out * k))  # [T, C_out * k]
    taps = taps.view(t, c_out, m, s).to(torch.promote_types(x.dtype, torch.float32))
    out = taps.new_zeros(c_out, t + m - 1, s)
    for r in range(m):
        out[:, r : r + t] += taps[:, :, r].transpose(0, 1)
    out = out.view(c_out, -1)
    if carry is not None:
        out[:, : carry.shape[-1]] += carry
    final = out[:, : t * s]
    if conv.bias is not None:
        final = final + conv.bias[:, None]
    return final.to(x.dtype)[None], out[:, t * s :].clone()
