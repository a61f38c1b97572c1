"""Frame-by-frame Qwen3-TTS generation: each 80 ms frame's 16 codes as soon as they exist.

qwen-tts only returns codes once the whole utterance is done: ``Qwen3TTSForConditionalGeneration
.generate`` hands the talker prompt to Hugging Face ``generate``, and every talker step runs a
second HF ``generate`` for the code predictor. This module keeps qwen-tts' prompt construction
(it runs qwen-tts' own code, see ``prepare_prompt``) and replaces only the two HF ``generate``
loops with one plain loop over the model's own weights (``DecoderStack``: the decoder layers
without Hugging Face's per-step bookkeeping, preallocated KV caches):

    prefill the talker on the prompt
    per frame:  sample codebook 0 from the talker's last hidden state (talker logits processing)
                the code predictor fills codebooks 1..15 (15 small steps, its own sampling)
                yield the 16 codes
                next talker input = sum of the 16 codebook embeddings + trailing text (or tts_pad)
                one talker step

``FrameBatch`` runs that loop for several utterances at once, joining and leaving between frames
(continuous batching); ``generate_frames`` is its batch of one.

Given the same inputs and PyTorch's kernels (float32) it reproduces ``tts.model.generate``
exactly, which the tests check frame for frame: greedily, and also when sampling from the same
global torch seed (same logits, same processors in the same order, random numbers drawn in the
same order). With the node's kernels (bfloat16) the logits are its own sums' and the tests hold
them to qwen-tts' by tolerance, teacher-forced frame by frame. The points where the equivalence
takes care:

* ``max_new_tokens`` counts codebook-0 tokens as HF does: the token sampled after the prefill is
  the first. A frame is completed one talker step after its token, so N tokens make at most N - 1
  frames; the N-th token is sampled by qwen-tts and thrown away (here it is not computed).
* EOS (``codec_eos_token_id``) as codebook 0 ends the utterance; its frame is not emitted. It is
  barred from the first ``MIN_NEW_TOKENS`` tokens, so a finished utterance has at least 2 frames.
* The top 1024 ids of the talker's vocabulary except EOS (control tokens) are never sampled.
* Repetition penalty applies to the talker only, over the codebook-0 tokens generated so far
  (HF sees an empty ``input_ids`` because the prompt is given as embeddings): none of the prompt,
  none of codebooks 1..15, and not at all on the first token.
* Logits are processed in float32 (HF casts them), in HF's order: repetition penalty, min
  length, suppressed ids, then for sampling temperature, top-k, top-p; softmax, multinomial.
  The code predictor has no penalty, suppression or EOS, only its own temperature/top-k/top-p.
* Talker rope: the 3 multimodal rope sections get identical positions. For one unpadded prompt
  of L positions ``get_rope_index`` gives 0..L-1 and a rope delta of 0, so the talker step that
  takes frame k's codes is at position L + k: positions are the KV cache's indices.
* The next talker input adds the 16 codebook embeddings in one ``sum`` as qwen-tts does (adding
  them one by one rounds differently in bf16), then trailing text position k after frame k.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from local_node.model.decoder_stack import DecoderStack

MIN_NEW_TOKENS = 2  # qwen-tts passes min_new_tokens=2 to the talker's generate
N_CONTROL_IDS = 1024  # the talker vocabulary's top 1024 ids are control tokens, never sampled


@dataclass
class SamplingConfig:
    """qwen-tts' generation settings. ``from_tts`` fills in the model's generation_config.json."""

    do_sample: bool = True
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 0.9
    repetition_penalty: float = 1.05
    subtalker_dosample: bool = True
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    subtalker_temperature: float = 0.9
    max_new_tokens: int = 2048  # codebook-0 tokens, as in qwen-tts: at most max_new_tokens - 1 frames

    @classmethod
    def from_tts(cls, tts: Any, **overrides: Any) -> "SamplingConfig":
        """The caller's values, else the checkpoint's generation_config.json, else qwen-tts' own
        defaults: the rule of qwen-tts' ``_merge_generate_kwargs``, which does the merging."""
        names = [f.name for f in dataclasses.fields(cls)]
        if unknown := set(overrides) - set(names):
            raise TypeError(f"unknown sampling settings: {', '.join(sorted(unknown))}")
        merged = tts._merge_generate_kwargs(**overrides)
        return cls(**{name: merged[name] for name in names})


@dataclass(frozen=True)
class Prompt:
    """One utterance's talker input, exactly as qwen-tts builds it (batch of one)."""

    inputs_embeds: torch.Tensor  # [1, L, H] the talker prefill
    trailing_text: torch.Tensor  # [1, T, H] added to the input after frame k while k < T
    tts_pad: torch.Tensor  # [1, 1, H] added after that
    ref_code: torch.Tensor | None = None  # [R, 16] ICL voice clone: qwen-tts decodes ref_code + frames, then cuts R off
    live: LiveText | None = None  # the trailing text is still being written: read it from here


class LiveText:
    """The trailing text of an utterance whose text is still being written (streaming text input:
    the talker reads one text token per frame). The writer appends the embeddings of each new
    piece's tokens and finally closes it, which appends the end-of-text embedding; the generation
    thread reads position k after frame k, and gets None while the text has not reached it: that
    utterance then waits, out of the batch's steps, for the writer. After the end of the text
    comes ``tts_pad``, as for any utterance.

    Waiting changes when a frame is made, never what it is: the talker sees the same inputs in the
    same order as if all of the text had been there from the start.
    """

    def __init__(self, known: torch.Tensor, end: torch.Tensor, pad: torch.Tensor) -> None:
        self._parts = [known[0]]  # [n, H] pieces
        self._flat = known[0]
        self._end = end  # [1, 1, H] qwen-tts' tts_eos, after the last token
        self._pad = pad
        self._lock = threading.Lock()
        self.closed = False
        self.listeners: list[Callable[[], None]] = []  # told when text arrives (the batcher wakes)
        self.waits = 0  # times the talker caught up with the text
        self.waited = 0.0  # seconds it spent waiting, in all
        self._waiting_since: float | None = None

    def append(self, embeds: torch.Tensor) -> None:
        """More text: [1, n, H] embeddings of its tokens."""
        with self._lock:
            if self.closed:
                raise ValueError("the text was closed")
            self._parts.append(embeds[0])
        self._changed()

    def close(self) -> None:
        """No more text: the end-of-text embedding follows the last token."""
        with self._lock:
            if not self.closed:
                self._parts.append(self._end[0])
                self.closed = True
        self._changed()

    def at(self, k: int) -> torch.Tensor | None:
        """The input to add at position ``k`` ([1, 1, H]), or None while the text is not there yet."""
        with self._lock:
            if len(self._parts) > 1:
                self._flat = torch.cat(self._parts)
                self._parts = [self._flat]
            if k < self._flat.shape[0]:
                found: torch.Tensor | None = self._flat[k : k + 1][None]
            else:
                found = self._pad if self.closed else None
            now = time.monotonic()
            if found is None and self._waiting_since is None:
                self.waits += 1
                self._waiting_since = now
            elif found is not None and self._waiting_since is not None:
                self.waited += now - self._waiting_since
                self._waiting_since = None
            return found

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()


# --- the prompt: qwen-tts' own code, stopped where it would call HF generate ------------------


def prepare_prompt(
    tts: Any,
    *,
    kind: str,
    text: str,
    language: str = "Auto",
    speaker: str | None = None,
    instruct: str | None = None,
    voice_clone_prompt: Any = None,
    ref_audio: Any = None,
    ref_text: str | None = None,
    x_vector_only_mode: bool = False,
    non_streaming_mode: bool | None = None,
) -> Prompt:
    """Build the talker prompt for one utterance the way ``tts.generate_<kind>`` does.

    qwen-tts has no function that only builds the prompt: ``Qwen3TTSModel.generate_custom_voice``
    & co. template and tokenize the texts, and ``Qwen3TTSForConditionalGeneration.generate``
    turns those into embeddings and passes them straight to ``self.talker.generate``. So the
    wrapper method runs unchanged on a shallow copy of ``tts`` whose model's talker stops at
    ``generate`` and hands back what it was given. Nothing shared is modified.

    kind "base" clones a voice: pass ``voice_clone_prompt`` (from ``tts.create_voice_clone_prompt``)
    or ``ref_audio`` with ``ref_text`` (in-context) or ``x_vector_only_mode=True``.
    ``non_streaming_mode`` None keeps the wrapper method's default, which differs: True (all of
    the text in the prefill) for custom_voice and voice_design, False for base (the text after
    the prompt is fed one token per frame, as the prompt's ``trailing_text``).
    """
    if kind not in ("base", "custom_voice", "voice_design"):
        raise ValueError(f"kind must be base, custom_voice or voice_design, not {kind!r}")
    if kind == "base" and voice_clone_prompt is None:
        voice_clone_prompt = tts.create_voice_clone_prompt(ref_audio=ref_audio, ref_text=ref_text, x_vector_only_mode=x_vector_only_mode)
    if kind == "base" and not isinstance(voice_clone_prompt, (list, dict)):
        voice_clone_prompt = [voice_clone_prompt]  # one VoiceClonePromptItem
    common: dict[str, Any] = dict(text=text, language=language)
    if non_streaming_mode is not None:
        common["non_streaming_mode"] = non_streaming_mode
    capturing = copy.copy(tts)
    capturing.model = _PromptOnlyModel(tts.model)
    try:
        if kind == "custom_voice":
            capturing.generate_custom_voice(speaker=speaker, instruct=instruct, **common)
        elif kind == "voice_design":
            capturing.generate_voice_design(instruct=instruct, **common)
        else:
            capturing.generate_voice_clone(voice_clone_prompt=voice_clone_prompt, **common)
    except _TalkerInputs as captured:
        got = captured.kwargs
    else:
        raise RuntimeError("qwen-tts did not reach the talker's generate")
    if got["inputs_embeds"].shape[0] != 1 or not bool(got["attention_mask"].all()):
        raise ValueError("one unpadded utterance expected")
    return Prompt(got["inputs_embeds"], got["trailing_text_hidden"], got["tts_pad_embed"], _icl_ref_code(voice_clone_prompt))


def live_prompt(prompt: Prompt) -> Prompt:
    """``prompt``, built with streaming text input (``non_streaming_mode=False``), with its text
    left open: the end of its trailing text waits in a ``LiveText`` for the rest to be written."""
    text = prompt.trailing_text
    if prompt.ref_code is not None:
        raise ValueError("an in-context clone aligns its text with the reference; write live text to an x-vector clone")
    return dataclasses.replace(prompt, live=LiveText(text[:, :-1], text[:, -1:], prompt.tts_pad))


def text_embeddings(tts: Any, text: str) -> torch.Tensor:
    """The trailing-text inputs of ``text`` ([1, n, H]), as qwen-tts embeds a streaming prompt's
    text: its tokens (tokenized alone: begin it where a word begins), embedded and projected."""
    talker = tts.model.talker
    ids = tts.processor(text=text, return_tensors="pt")["input_ids"].to(talker.device)
    return talker.text_projection(talker.get_text_embeddings()(ids))


def _icl_ref_code(voice_clone_prompt: Any) -> torch.Tensor | None:
    """The reference codes qwen-tts puts before the new frames when decoding an ICL clone."""
    if voice_clone_prompt is None:
        return None
    if isinstance(voice_clone_prompt, dict):
        codes = voice_clone_prompt.get("ref_code")
        return codes[0] if codes is not None and voice_clone_prompt["icl_mode"][0] else None
    item = voice_clone_prompt[0]
    return item.ref_code if item.icl_mode else None


class _TalkerInputs(Exception):
    def __init__(self, kwargs: dict) -> None:
        super().__init__("talker inputs")
        self.kwargs = kwargs


class _PromptOnlyTalker:
    """The real talker in every respect but ``generate``, which raises with its arguments."""

    def __init__(self, talker: Any) -> None:
        self._talker = talker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._talker, name)

    def generate(self, **kwargs: Any) -> None:
        raise _TalkerInputs(kwargs)


class _PromptOnlyModel:
    """The real Qwen3TTSForConditionalGeneration, with ``self.talker`` as above inside generate."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.talker = _PromptOnlyTalker(model.talker)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def generate(self, **kwargs: Any) -> Any:
        return type(self._model).generate(self, **kwargs)


# --- the loop ----------------------------------------------------------------------------------


@torch.inference_mode()
def generate_frames(
    model: Any,
    prompt: Prompt,
    sampling: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    cancelled: threading.Event | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each frame's 16 codes (LongTensor [16]) as soon as they exist.

    ``model`` is ``tts.model`` (Qwen3TTSForConditionalGeneration). Stops at EOS, after
    ``sampling.max_new_tokens - 1`` frames, or, checked before every frame's work, when
    ``cancelled`` is set. ``generator`` None draws from torch's global RNG, as qwen-tts does.
    """
    batch = FrameBatch(model)
    utterance = batch.add(prompt, sampling, generator)
    while not utterance.done:
        if cancelled is not None and cancelled.is_set():
            return
        if (codes := batch.step().get(utterance)) is not None:
            yield codes


@dataclass(eq=False)
class Utterance:
    """One prompt's place in a ``FrameBatch``."""

    prompt: Prompt
    sampling: SamplingConfig
    generator: torch.Generator | None
    row: int  # its row of the talker's KV cache while in the batch
    talker_processors: list  # Hugging Face logits processors, in the order generate applies them
    predictor_processors: list
    inputs: torch.Tensor | None  # the talker's next input: the prompt, then one position per frame; None: waits for text
    history: torch.Tensor  # codebook-0 tokens so far [1, frames]
    frames: int = 0
    done: bool = False  # EOS, or its frame budget spent; it has left the batch
    codes_sum: torch.Tensor | None = None  # the last frame's summed codebook embeddings, while it waits for text

    def ready(self) -> bool:
        """Whether it can take the next step: its input is there, or its text now is."""
        if self.inputs is None:
            assert self.codes_sum is not None and self.prompt.live is not None
            text = self.prompt.live.at(self.frames - 1)
            if text is not None:
                self.inputs, self.codes_sum = self.codes_sum + text, None
        return self.inputs is not None


class FrameBatch:
    """Utterances of one model advanced together, one frame each per ``step``; they may join and
    leave between steps (continuous batching).

    Each step runs every projection once for all utterances (at batch n a weight read from memory
    serves n rows); attention, logits processing and sampling stay per utterance, in the order one
    utterance alone would do them, so a batch of one computes exactly what the single-utterance
    loop computed. A new utterance's prompt is prefilled on its own
    in the step after it joins, as its length differs from everyone else's.
    """

    def __init__(self, model: Any, rows: int = 1) -> None:
        self.model = model
        talker = model.talker
        self.cfg = model.config.talker_config
        self.talker = DecoderStack(talker.model, capacity=256, batch=rows)
        self.predictor = DecoderStack(talker.code_predictor.model, capacity=self.cfg.num_code_groups + 1, batch=rows)
        self.kernels = self.talker.kernels  # the node's kernels the weights were laid out for, if any
        self.free_rows = list(range(rows))
        self.utterances: list[Utterance] = []

    def add(self, prompt: Prompt, sampling: SamplingConfig, generator: torch.Generator | None = None) -> Utterance:
        """Join the batch; the prompt is prefilled in the next ``step``. An utterance with no
        frames to make (``max_new_tokens`` < 2) comes back ``done`` without joining."""
        device = self.model.talker.device
        utterance = Utterance(
            prompt=prompt,
            sampling=sampling,
            generator=generator,
            row=-1,
            talker_processors=_talker_processors(sampling, self.cfg, device),
            predictor_processors=_predictor_processors(sampling),
            inputs=prompt.inputs_embeds,
            history=torch.empty(1, 0, dtype=torch.long, device=device),
        )
        if sampling.max_new_tokens - 1 < 1:
            utterance.done = True
            return utterance
        if not self.free_rows:
            raise RuntimeError("the batch is full")
        utterance.row = self.free_rows.pop(0)
        self.talker.reset(utterance.row)
        self.utterances.append(utterance)
        return utterance

    def remove(self, utterance: Utterance) -> None:
        if utterance in self.utterances:
            self.utterances.remove(utterance)
            self.free_rows.append(utterance.row)
        utterance.done = True

    def step(self) -> dict[Utterance, torch.Tensor]:
        """One frame for every utterance in the batch: {utterance: its 16 codes}. Utterances that
        end (EOS now, or frame budget spent with this frame) leave the batch, marked ``done``."""
        order = [u for u in self.utterances if u.ready()]
        if not order:
            return {}
        talker = self.model.talker
        hidden = self._talker_step(order)  # [n, 1, H], rows in ``order``
        logits = talker.codec_head(hidden)[:, -1]
        continuing, code0 = [], []
        for utterance, row_logits in zip(order, logits.split(1)):
            scores = _process(utterance.talker_processors, utterance.history, row_logits)
            code = _pick(scores, utterance.sampling.do_sample, utterance.generator)
            if code.item() == self.cfg.codec_eos_token_id:
                self.remove(utterance)
                continue
            utterance.history = torch.cat([utterance.history, code[:, None]], dim=1)
            continuing.append(utterance)
            code0.append(code)
        if not continuing:
            return {}
        if len(continuing) < len(order):
            hidden = hidden[[order.index(u) for u in continuing]]
        codes, embeds = self._predict_codes(continuing, hidden, torch.cat(code0))
        summed = embeds.sum(1, keepdim=True)  # the 16 codebook embeddings, in one sum as qwen-tts adds them
        out = {}
        for i, utterance in enumerate(continuing):
            out[utterance] = codes[i]
            utterance.inputs, utterance.codes_sum = None, summed[i : i + 1]
            utterance.frames += 1
            if utterance.prompt.live is None:
                text = utterance.prompt.trailing_text
                k = utterance.frames - 1
                utterance.inputs = utterance.codes_sum + (text[:, k : k + 1] if k < text.shape[1] else utterance.prompt.tts_pad)
            else:
                utterance.ready()  # the text may be there already
            if utterance.frames >= utterance.sampling.max_new_tokens - 1:
                self.remove(utterance)
        return out

    @property
    def waiting(self) -> bool:
        """Whether every utterance in the batch waits for text (a step would do nothing)."""
        return bool(self.utterances) and not any(u.ready() for u in self.utterances)

    def _talker_step(self, order: list[Utterance]) -> torch.Tensor:
        """Run each utterance's pending talker input; their last hidden states [n, 1, H] in ``order``."""
        hidden: dict[Utterance, torch.Tensor] = {}
        inputs = {u: u.inputs for u in order if u.inputs is not None}
        for u in [u for u in order if u.frames == 0]:  # prompts: one at a time, their lengths differ
            hidden[u] = self.talker.forward(inputs[u], rows=[u.row])[:, -1:]
        if stepping := [u for u in order if u.frames > 0]:
            out = self.talker.forward(torch.cat([inputs[u] for u in stepping]), rows=[u.row for u in stepping])
            hidden.update(zip(stepping, out.split(1)))
        return torch.cat([hidden[u] for u in order])

    def _predict_codes(self, continuing: list[Utterance], hidden: torch.Tensor, code0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebooks 1..15 for each utterance, from its talker hidden state and codebook 0, one
        small step each for all at once. Returns codes [n, 16] and their embeddings [n, 16, H]."""
        talker = self.model.talker
        predictor = talker.code_predictor
        embeds = [talker.model.codec_embedding(code0[:, None])]
        codes = [code0]
        self.predictor.reset()  # a fresh sequence per frame: [talker hidden, code 0, code 1, ...]
        self.predictor.forward(predictor.small_to_mtp_projection(hidden))  # one position at a time: 2-row products cost 2x+
        for group in range(self.cfg.num_code_groups - 1):
            out = self.predictor.forward(predictor.small_to_mtp_projection(embeds[-1]))
            logits = predictor.lm_head[group](out[:, -1])
            codes.append(
                torch.cat(
                    [
                        _pick(_process(u.predictor_processors, None, row), u.sampling.subtalker_dosample, u.generator)
                        for u, row in zip(continuing, logits.split(1))
                    ]
                )
            )
            embeds.append(predictor.model.codec_embedding[group](codes[-1][:, None]))
        return torch.stack(codes, dim=1), torch.cat(embeds, dim=1)


def _process(processors: list, history: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    scores = logits.float()  # HF generate processes and samples in float32
    for processor in processors:  # as LogitsProcessorList does, without its per-call signature check
        scores = processor(history, scores)
    return scores


def _pick(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    if do_sample:
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


# --- logits processing: Hugging Face's own processors, in the order its generate applies them --


def _talker_processors(s: SamplingConfig, cfg: Any, device: torch.device | str = "cpu") -> list:
    eos = cfg.codec_eos_token_id
    suppressed = [i for i in range(cfg.vocab_size - N_CONTROL_IDS, cfg.vocab_size) if i != eos]
    processors: list = []
    if s.repetition_penalty is not None and s.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=s.repetition_penalty))
    # HF turns min_new_tokens into min_length too (the prompt is 0 tokens long): both apply.
    processors.append(MinLengthLogitsProcessor(MIN_NEW_TOKENS, eos, device=device))
    processors.append(MinNewTokensLengthLogitsProcessor(0, MIN_NEW_TOKENS, eos, device=device))
    processors.append(SuppressTokensLogitsProcessor(suppressed, device=device))
    if s.do_sample:
        processors.extend(_warpers(s.temperature, s.top_k, s.top_p))
    return processors


def _predictor_processors(s: SamplingConfig) -> list:
    return _warpers(s.subtalker_temperature, s.subtalker_top_k, s.subtalker_top_p) if s.subtalker_dosample else []


def _warpers(temperature: float | None, top_k: int | None, top_p: float | None) -> list:
    warpers: list = []
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers
