"""Qwen3-TTS through the qwen-tts package: loading, voices, and synthesis streamed frame by frame."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from local_node.config import ConfigError, ModelConfig
from local_node.engine.base import SAMPLE_RATE, Cancelled, Job, JobError, ModelUnavailable, TextFeed
from local_node.engine.batcher import Batcher
from local_node.engine.text_split import split_text
from local_node.kernels import tiers
from local_node.model.codec_stream import StreamingDecoder
from local_node.model.generation import Prompt, SamplingConfig, live_prompt, prepare_prompt, text_embeddings
from local_node.model.packing import prepare_for_generation
from local_node.model.qwen_import import import_qwen_tts
from tunnel.protocol import ModelInfo

log = logging.getLogger("local_node.qwen")

# Hugging Face generate warns on every call that it picked the EOS id as padding; that is expected.
logging.getLogger("transformers.generation.utils").setLevel(logging.ERROR)
# qwen-tts logs at INFO, on every request, that it filled in a default sub-config.
logging.getLogger("qwen_tts").setLevel(logging.WARNING)
# The hub client logs each of its retries with the whole exception; a failure is reported once, below.
logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# text_input -> qwen-tts' non_streaming_mode: "whole" puts all of the text in the prompt, "streaming"
# feeds it one token per frame after the first (a far shorter prompt to prefill: earlier first
# audio), "auto" keeps qwen-tts' default for the model type (whole, but streaming for Base).
_NON_STREAMING_MODE = {"auto": None, "whole": True, "streaming": False}
# Pieces only bound the prompt; audio streams frame by frame whatever their length.
MAX_PIECE_CHARS = 300
# BCP 47 primary language -> Qwen3-TTS' name for it.
_LANGUAGES = {
    "zh": "Chinese",
    "en": "English",
    "ja": "Japanese",
    "ko": "Korean",
    "de": "German",
    "fr": "French",
    "ru": "Russian",
    "pt": "Portuguese",
    "es": "Spanish",
    "it": "Italian",
}


@dataclass(frozen=True)
class _Voice:
    language: str
    speaker: str | None = None
    description: str | None = None
    clone_prompt: Any = None  # qwen-tts VoiceClonePromptItem list, computed once at start


class QwenEngine:
    def __init__(self, config: ModelConfig, dtype: str = "bfloat16", codec_dtype: str = "auto", threads: int = 1) -> None:
        self.config = config
        started = time.monotonic()
        self.tts = _load(config, _DTYPES[dtype])
        self.tts.model.speech_tokenizer.model.to(resolve_codec_dtype(codec_dtype))
        # Fused, packed projections (bit-identical results); int8 ones when the config asks.
        prepare_for_generation(self.tts.model, int8=config.weights == "int8")
        if config.weights == "int8":
            log.info("%s: decoder projections in int8 (weights: int8; codes differ from the %s model's)", config.name, dtype)
        self.kind: str = self.tts.model.tts_model_type  # "base", "custom_voice" or "voice_design"
        self.voices = self._build_voices()
        self.info = ModelInfo(
            config.name, config.aliases, tuple(self.voices), any_voice=self.kind == "voice_design", clones=self.kind == "base"
        )
        self.source = f"{config.source} ({dtype})"
        self.chunk_schedule = config.chunk_frames
        self.concurrency = config.max_batch
        self.batcher = Batcher(self.tts.model, rows=config.max_batch, name=config.name, threads=threads)
        self.on_step = lambda frames, seconds: None  # the worker sets it, after the warm-up
        self.on_text_wait = lambda waits, seconds: None  # and this: how a live utterance waited for text
        self.batcher.on_step = lambda frames, seconds: self.on_step(frames, seconds)
        self._tokenizer = threading.Lock()  # HF's fast tokenizers fail when two threads use one
        log.info("%s: loaded %s model from %s in %.1f s", config.name, self.kind, config.source, time.monotonic() - started)

    # --- voices ---------------------------------------------------------------------------

    def _build_voices(self) -> dict[str, _Voice]:
        where = f"models.{self.config.name}"
        languages = set(self.tts.get_supported_languages() or [])
        default_language = self.default_language = self._language(self.config.language, languages, f"{where}.language")
        voices: dict[str, _Voice] = {}
        if self.kind == "custom_voice":
            for speaker in self.tts.get_supported_speakers() or []:
                voices[speaker] = _Voice(default_language, speaker=speaker)
        for voice in self.config.voices:
            language = self._language(voice.language, languages, f"{where}.voices.{voice.name}.language") or default_language
            if self.kind == "custom_voice":
                speaker = (voice.speaker or "").lower()
                if speaker not in voices:
                    raise ConfigError(f"{where}.voices.{voice.name}: a CustomVoice model takes speaker: one of {', '.join(sorted(voices))}")
                voices[voice.name] = _Voice(language, speaker=speaker)
            elif self.kind == "voice_design":
                if not voice.description:
                    raise ConfigError(f"{where}.voices.{voice.name}: a VoiceDesign model takes description:")
                voices[voice.name] = _Voice(language, description=voice.description)
            else:
                if not voice.ref_audio:
                    raise ConfigError(f"{where}.voices.{voice.name}: a Base model clones voices; give ref_audio: (and ref_text:)")
                try:
                    prompt = self.tts.create_voice_clone_prompt(
                        ref_audio=str(voice.ref_audio), ref_text=voice.ref_text, x_vector_only_mode=not voice.ref_text
                    )
                except Exception as exc:  # unreadable or unusable audio: a config problem, not a crash
                    raise ConfigError(f"{where}.voices.{voice.name}.ref_audio: cannot use {voice.ref_audio}: {exc}") from exc
                voices[voice.name] = _Voice(language, clone_prompt=prompt)
        return voices

    @staticmethod
    def _language(value: str | None, supported: set[str], where: str) -> str:
        if value is None:
            return "Auto"
        if supported and value not in supported:
            raise ConfigError(f"{where}: {value!r} is not supported; choose from {', '.join(sorted(supported))}")
        return value

    # --- kept voices (the Cloner interface) ------------------------------------------------

    def clone_prompt(self, sample: np.ndarray, ref_text: str | None) -> dict[str, Any]:
        with self._tokenizer:
            (item,) = self.tts.create_voice_clone_prompt(
                ref_audio=(sample, SAMPLE_RATE), ref_text=ref_text, x_vector_only_mode=not ref_text
            )
        return dict(vars(item))

    def keep_voice(self, voice_id: str, prompt: dict[str, Any], language: str | None) -> None:
        item = import_qwen_tts().inference.qwen3_tts_model.VoiceClonePromptItem(**prompt)
        # A new dict, swapped in whole: synthesis threads read the old one meanwhile.
        self.voices = {**self.voices, voice_id: _Voice(self._kept_language(language), clone_prompt=[item])}

    def drop_voice(self, voice_id: str) -> None:
        self.voices = {name: voice for name, voice in self.voices.items() if name != voice_id}

    def _kept_language(self, language: str | None) -> str:
        """A kept voice's language (a BCP 47 tag such as en-US, or a Qwen name) as this model names
        it; the model's default when it has no such language."""
        supported = set(self.tts.get_supported_languages() or [])
        name = _LANGUAGES.get((language or "").split("-")[0].lower(), language)
        return name if name in supported else self.default_language

    # --- the Engine interface -------------------------------------------------------------

    def check(self, job: Job) -> None:
        if self.kind == "voice_design":
            voice = self.voices.get(job.voice)
            if not job.instructions and voice is None:
                raise JobError(
                    "invalid_request",
                    "A VoiceDesign model needs the voice described in 'instructions' "
                    f"(or a configured voice: {', '.join(self.voices) or 'none'}).",
                )
        elif job.voice not in self.voices:
            raise JobError("unknown_voice", f"Voice '{job.voice}' is not available; choose from {', '.join(self.voices)}.")

    def count_tokens(self, text: str) -> int:
        with self._tokenizer:
            return len(self.tts.processor.tokenizer(text)["input_ids"])

    def synthesize(self, job: Job, cancelled: threading.Event) -> Iterator[np.ndarray]:
        """Stream each piece frame by frame: codes from the model's batcher (our generation loop,
        shared with the other syntheses in progress), PCM from the incremental codec decoder, as
        soon as each chunk of frames is decoded."""
        if job.feed is not None:
            yield from self._synthesize_live(job, job.feed, cancelled)
            return
        for piece in split_text(job.text, MAX_PIECE_CHARS):
            with self._tokenizer:
                prompt = self._prompt(piece, job)
            decoder = StreamingDecoder(self.tts.model.speech_tokenizer, self.chunk_schedule)
            if prompt.ref_code is not None:  # an in-context clone continues its reference audio
                decoder.prime(prompt.ref_code)
            sampling = SamplingConfig.from_tts(self.tts, max_new_tokens=self._max_frames(piece) + 1)
            yield from self.batcher.run(prompt, sampling, cancelled, on_frame=decoder.push, on_end=decoder.flush)
            if cancelled.is_set():
                raise Cancelled()

    def _synthesize_live(self, job: Job, feed: TextFeed, cancelled: threading.Event) -> Iterator[np.ndarray]:
        """One utterance for all of a text still being written: it starts from the first
        ``live_start_words`` words, and each later piece is appended to it (a writer thread
        tokenizes them as they come), so voice and prosody carry through the whole text."""
        first = feed.take(self.config.live_start_words, cancelled)
        if first is None:
            return
        with self._tokenizer:
            prompt = live_prompt(self._prompt(first, job, streaming=True))
        live = prompt.live
        assert live is not None

        def write() -> None:
            try:
                while (piece := feed.take(1, cancelled)) is not None:
                    with self._tokenizer, torch.inference_mode():
                        live.append(text_embeddings(self.tts, piece))
            finally:
                live.close()

        threading.Thread(target=write, name=f"text-{self.config.name}", daemon=True).start()
        decoder = StreamingDecoder(self.tts.model.speech_tokenizer, self.chunk_schedule)
        sampling = SamplingConfig.from_tts(self.tts, max_new_tokens=(self.config.max_new_frames or 8192) + 1)
        yield from self.batcher.run(prompt, sampling, cancelled, on_frame=decoder.push, on_end=decoder.flush)
        self.on_text_wait(live.waits, live.waited)
        if cancelled.is_set():
            raise Cancelled()

    def warm_up(self) -> None:
        """Synthesise up to the first chunk, so the first real request does not pay for lazy
        initialisation (weights paged in, kernels and buffers set up) in every stage. A Base model
        with no voice of its own yet has nothing to say: it warms up on its first request."""
        if self.kind == "base" and not self.voices:
            return
        started = time.monotonic()
        voice = next(iter(self.voices), "warmup")
        job = Job("Hello.", voice, "A clear, calm voice." if self.kind == "voice_design" else None)
        enough = threading.Event()
        try:
            for _ in self.synthesize(job, enough):
                enough.set()
        except Cancelled:
            pass
        log.info("%s: warmed up in %.1f s", self.config.name, time.monotonic() - started)

    # --- generation -----------------------------------------------------------------------

    def _prompt(self, text: str, job: Job, streaming: bool = False) -> Prompt:
        """The prompt of ``text``; ``streaming``: with streaming text input whatever the config
        says, and a clone from its timbre alone (live text cannot follow an in-context clone's
        reference, to which the prompt aligns the text)."""
        voice = self.voices.get(job.voice)
        common = dict(
            kind=self.kind,
            text=text,
            language=voice.language if voice else self.default_language,
            non_streaming_mode=False if streaming else _NON_STREAMING_MODE[self.config.text_input],
        )
        if self.kind == "custom_voice":
            return prepare_prompt(self.tts, speaker=voice.speaker, instruct=job.instructions, **common)
        if self.kind == "voice_design":
            return prepare_prompt(self.tts, instruct=job.instructions or voice.description, **common)
        clone = voice.clone_prompt
        if streaming and clone[0].icl_mode:
            item = clone[0]
            clone = [type(item)(ref_code=None, ref_spk_embedding=item.ref_spk_embedding, x_vector_only_mode=True, icl_mode=False)]
        return prepare_prompt(self.tts, voice_clone_prompt=clone, **common)

    def _max_frames(self, text: str) -> int:
        return self.config.max_new_frames or _frame_budget(text)


def resolve_codec_dtype(codec_dtype: str) -> torch.dtype:
    """``codec_dtype`` from the config; "auto" is bfloat16 only where the CPU has bfloat16
    arithmetic (AVX-512 BF16 or AMX): there the codec's convolutions run about 3x faster than in
    float32, elsewhere they are emulated and many times slower. qwen-tts itself runs the codec in
    the model's dtype. A tier below AVX-512 BF16 asked for by ``QWEN3_TTS_ISA`` counts as a CPU
    without it."""
    if codec_dtype != "auto":
        return _DTYPES[codec_dtype]
    capped = tiers.requested() in ("avx512", "avx2", "neon")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native and not capped else torch.float32


def _frame_budget(text: str) -> int:
    """A generous cap on codec frames for one piece: speech runs about one frame per character
    in English and three in Chinese; the cap only stops a model that never says EOS."""
    return min(8192, 25 + 6 * len(text))


def _load(config: ModelConfig, dtype: torch.dtype) -> Any:
    qwen_tts = import_qwen_tts()
    source = config.source
    is_folder = os.path.isabs(source)  # the config turned every local source into an absolute path
    if is_folder and not os.path.isdir(source):
        raise ModelUnavailable(f"models.{config.name}.source: no such folder {source}")
    if not is_folder:
        log.info("%s: loading %s from Hugging Face (downloaded once, then cached; a few GB)", config.name, source)
    try:
        return qwen_tts.Qwen3TTSModel.from_pretrained(source, dtype=dtype)
    except Exception as exc:  # hub, network and file errors come in many types; all mean "not here"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_folder:
            raise ModelUnavailable(f"models.{config.name}: cannot load {source}: {reason}") from exc
        raise ModelUnavailable(
            f"models.{config.name}: could not fetch '{source}' from Hugging Face ({reason}).\n"
            "  This machine may be offline or the hub unreachable. To fix it, either:\n"
            f"  - download the model where there is network: huggingface-cli download {source} --local-dir models/{config.name}\n"
            f"    copy that folder here and set models.{config.name}.source: ./models/{config.name}\n"
            "  - or check the pipeline without weights: ./run.sh --tiny (tiny random checkpoints; they produce noise)"
        ) from exc
