"""The voices and consent recordings this node keeps: uploads checked and stored (``VoiceStore``),
and every voice given to each model that speaks kept voices (a Base model: ``Cloner``).

Every method blocks (decoding, prompts, disk) and runs on a worker thread, one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from local_node.engine.base import SAMPLE_RATE, Cloner, JobError
from local_node.serving.recordings import UnusableRecording, decode_recording
from local_node.serving.voice_store import VoiceStore
from tunnel.protocol import MAX_KEPT, Consent, ConsentList, KeptVoice, Upload, VoiceList

log = logging.getLogger("local_node.voices")


class VoiceKeeper:
    def __init__(self, store: VoiceStore, cloners: dict[str, Cloner]) -> None:
        self.store = store
        self.cloners = cloners  # model name -> engine
        self._lock = threading.Lock()

    def load(self) -> None:
        """Give every model each kept voice, computing the prompts it lacks (a model added to the
        config since the voice was uploaded, or other weights under the same name)."""
        started, computed = time.monotonic(), 0
        for voice in list(self.store.voices.values()):
            for model, engine in self.cloners.items():
                prompt = self.store.prompt(voice.id, model, engine.source)
                if prompt is None:
                    prompt = engine.clone_prompt(self.store.sample(voice.id), self.store.ref_texts.get(voice.id))
                    self.store.save_prompt(voice.id, model, engine.source, prompt)
                    computed += 1
                engine.keep_voice(voice.id, prompt, voice.language)
        if self.store.voices or self.store.consents:
            log.info(
                "keeping %d voices and %d consent recordings (%d prompts computed) in %.1f s, from %s",
                len(self.store.voices),
                len(self.store.consents),
                computed,
                time.monotonic() - started,
                self.store.folder,
            )

    def lists(self) -> tuple[VoiceList, ConsentList]:
        """What this node keeps, as the relay is told it."""
        voices = sorted(self.store.voices.values(), key=lambda v: (v.created_at, v.id))
        consents = sorted(self.store.consents.values(), key=lambda c: (c.created_at, c.id))
        return VoiceList(tuple(voices)), ConsentList(tuple(consents))

    def upload(self, upload: Upload, data: bytes) -> None:
        """Check and keep an uploaded voice sample or consent recording. Raises JobError."""
        with self._lock:
            if upload.kind == "voice":
                self._keep_voice(upload, data)
            else:
                self._keep_consent(upload, data)

    def forget(self, kind: str, object_id: str) -> None:
        with self._lock:
            if not self.store.remove(kind, object_id):
                raise JobError("not_found", f"This node keeps no {kind} {object_id}.")
            if kind == "voice":
                for engine in self.cloners.values():
                    engine.drop_voice(object_id)
            log.info("forgot %s %s", kind, object_id)

    def rename(self, consent_id: str, name: str) -> None:
        with self._lock:
            if consent_id not in self.store.consents:
                raise JobError("not_found", f"This node keeps no consent {consent_id}.")
            self.store.rename_consent(consent_id, name)

    def _keep_voice(self, upload: Upload, data: bytes) -> None:
        if not self.cloners:
            raise JobError("invalid_request", "This node serves no model that speaks uploaded voices (a Base model).")
        if len(self.store.voices) >= MAX_KEPT:
            raise JobError("invalid_request", f"This node keeps at most {MAX_KEPT} voices; delete one first.")
        sample = _decoded(data, "the audio sample")
        started = time.monotonic()
        prompts: dict[str, tuple[str, Any]] = {}
        for model, engine in self.cloners.items():
            try:
                prompts[model] = (engine.source, engine.clone_prompt(sample, upload.ref_text))
            except Exception:
                log.exception("voice %s: %s could not make a clone prompt", upload.object_id, model)
                raise JobError("internal_error", "The node could not make a voice of this sample.") from None
        voice = KeptVoice(upload.object_id, upload.name, upload.created_at, upload.language, upload.consent)
        self.store.add_voice(voice, upload.ref_text, sample, prompts)
        for model, engine in self.cloners.items():
            engine.keep_voice(voice.id, prompts[model][1], voice.language)
        log.info(
            "kept voice %s: %.1f s sample, %s, prompts for %s in %.1f s",
            voice.id,
            sample.size / SAMPLE_RATE,
            "with its words (in-context)" if upload.ref_text else "speaker embedding only",
            ", ".join(prompts),
            time.monotonic() - started,
        )

    def _keep_consent(self, upload: Upload, data: bytes) -> None:
        if len(self.store.consents) >= MAX_KEPT:
            raise JobError("invalid_request", f"This node keeps at most {MAX_KEPT} consent recordings; delete one first.")
        recording = _decoded(data, "the consent recording")
        consent = Consent(upload.object_id, upload.name, upload.language or "", upload.created_at)
        self.store.add_consent(consent, recording)
        log.info("kept consent %s: %.1f s", consent.id, recording.size / SAMPLE_RATE)


def _decoded(data: bytes, what: str) -> Any:
    try:
        return decode_recording(data, what)
    except UnusableRecording as exc:
        reason = str(exc)
        raise JobError("invalid_request", reason[:1].upper() + reason[1:] + "; nothing was kept.") from None
