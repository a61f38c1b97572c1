"""Kept voices and consent recordings on the node's disk, each written whole or not at all.

Layout (``voices_dir``, by default ``voices/`` next to the config file)::

    voices/<voice id>/voice.json          name, created_at, language, consent, ref_text
                      sample.wav          the sample, 24 kHz mono 16-bit
                      prompt-<model>.pt   that model's clone prompt (recomputed when missing)
    consents/<id>/consent.json, recording.wav
    .incoming/                            work in progress; emptied at start

A new entry is written into ``.incoming/``, flushed to disk, then renamed into place in one step,
so a node killed at any moment comes back with the entry whole or without it. A deletion renames
the entry out of place first; a file replaced in an entry (a prompt, a consent's name) is written
beside it under a dot name, then renamed over it. Opening the store clears what was cut short.
Everything is readable by the node's user only (0700 / 0600), and nothing here logs a recording
or a prompt.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import shutil
import wave
from pathlib import Path
from typing import Any

import numpy as np

from local_node.engine.base import SAMPLE_RATE
from tunnel.protocol import Consent, KeptVoice

log = logging.getLogger("local_node.voices")

_ID = re.compile(r"(voice|cons)_[A-Za-z0-9]{1,58}")
_KINDS = {"voice": ("voices", "voice.json", "sample.wav"), "consent": ("consents", "consent.json", "recording.wav")}


class VoiceStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        for sub in ("", "voices", "consents", ".incoming"):
            (folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder / sub, 0o700)
        for leftover in (folder / ".incoming").iterdir():  # an entry or deletion cut short
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in folder.glob("*/*/.*"):  # a file being replaced (_write_atomically) when cut short
            leftover.unlink(missing_ok=True)
        self.voices: dict[str, KeptVoice] = {}
        self.ref_texts: dict[str, str | None] = {}
        self.consents: dict[str, Consent] = {}
        for entry in sorted((folder / "voices").iterdir()):
            meta = _read_meta(entry / "voice.json")
            if meta is not None and _ID.fullmatch(entry.name) and meta.get("id") == entry.name:
                self.voices[entry.name] = KeptVoice(entry.name, meta["name"], meta["created_at"], meta.get("language"), meta.get("consent"))
                self.ref_texts[entry.name] = meta.get("ref_text")
        for entry in sorted((folder / "consents").iterdir()):
            meta = _read_meta(entry / "consent.json")
            if meta is not None and _ID.fullmatch(entry.name) and meta.get("id") == entry.name:
                self.consents[entry.name] = Consent(entry.name, meta["name"], meta["language"], meta["created_at"])

    # --- reading --------------------------------------------------------------------------

    def sample(self, voice_id: str) -> np.ndarray:
        return _read_wav(self._path("voice", voice_id) / "sample.wav")

    def prompt(self, voice_id: str, model: str, source: str) -> dict[str, Any] | None:
        """The clone prompt kept for ``model``, if it was made from the same weights (``source``)."""
        import torch  # not at import: the node caps the vendor libraries before torch loads

        path = self._path("voice", voice_id) / _prompt_file(model)
        try:
            saved = torch.load(path, weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as exc:  # unreadable: recompute it rather than refuse to start
            log.warning("voice %s: the %s prompt cannot be read (%s); recomputing it", voice_id, model, type(exc).__name__)
            return None
        return saved["prompt"] if saved.get("source") == source else None

    # --- writing --------------------------------------------------------------------------

    def add_voice(self, voice: KeptVoice, ref_text: str | None, sample: np.ndarray, prompts: dict[str, tuple[str, Any]]) -> None:
        """Keep ``voice`` with its sample and its prompts ({model: (source, prompt)})."""
        meta = {**_voice_meta(voice), "ref_text": ref_text}
        files = {"voice.json": _json_bytes(meta), "sample.wav": _wav_bytes(sample)}
        for model, (source, prompt) in prompts.items():
            files[_prompt_file(model)] = _torch_bytes({"source": source, "prompt": prompt})
        self._place("voice", voice.id, files)
        self.voices[voice.id] = voice
        self.ref_texts[voice.id] = ref_text

    def add_consent(self, consent: Consent, recording: np.ndarray) -> None:
        meta = {"id": consent.id, "name": consent.name, "language": consent.language, "created_at": consent.created_at}
        self._place("consent", consent.id, {"consent.json": _json_bytes(meta), "recording.wav": _wav_bytes(recording)})
        self.consents[consent.id] = consent

    def save_prompt(self, voice_id: str, model: str, source: str, prompt: Any) -> None:
        _write_atomically(self._path("voice", voice_id) / _prompt_file(model), _torch_bytes({"source": source, "prompt": prompt}))

    def rename_consent(self, consent_id: str, name: str) -> None:
        old = self.consents[consent_id]
        consent = Consent(old.id, name, old.language, old.created_at)
        meta = {"id": consent.id, "name": name, "language": consent.language, "created_at": consent.created_at}
        _write_atomically(self._path("consent", consent_id) / "consent.json", _json_bytes(meta))
        self.consents[consent_id] = consent

    def remove(self, kind: str, object_id: str) -> bool:
        """Forget a voice or a consent; False if there was none by that id."""
        held = self.voices if kind == "voice" else self.consents
        if object_id not in held:
            return False
        doomed = self.folder / ".incoming" / f"{object_id}.deleted.{secrets.token_hex(4)}"
        os.rename(self._path(kind, object_id), doomed)  # gone from its place in one step
        _sync_dir(self._path(kind, object_id).parent)
        shutil.rmtree(doomed, ignore_errors=True)
        del held[object_id]
        self.ref_texts.pop(object_id, None)
        return True

    def _path(self, kind: str, object_id: str) -> Path:
        if not _ID.fullmatch(object_id):
            raise ValueError(f"not an id: {object_id!r}")
        return self.folder / _KINDS[kind][0] / object_id

    def _place(self, kind: str, object_id: str, files: dict[str, bytes]) -> None:
        """Write ``files`` as a new entry: all of them, durably, then into place in one rename."""
        final = self._path(kind, object_id)
        if final.exists():
            raise FileExistsError(f"{kind} {object_id} is kept already")
        staging = self.folder / ".incoming" / f"{object_id}.{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
        for name, data in files.items():
            _write_file(staging / name, data)
        _sync_dir(staging)
        os.rename(staging, final)
        _sync_dir(final.parent)


def _voice_meta(voice: KeptVoice) -> dict[str, Any]:
    return {"id": voice.id, "name": voice.name, "created_at": voice.created_at, "language": voice.language, "consent": voice.consent}


def _prompt_file(model: str) -> str:
    return "prompt-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model) + ".pt"


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("ignoring %s: missing or unreadable", path.parent.name)
        return None
    return meta if isinstance(meta, dict) else None


def _json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, ensure_ascii=False, indent=1).encode()


def _wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32767


def _torch_bytes(value: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a temporary file beside it, then a rename."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    _write_file(temporary, data)
    os.replace(temporary, path)
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
