"""The node's kept voices on disk: written whole or not at all, whenever the node is killed.

A child process adds, renames and removes voices and consents without pause; it is killed with
SIGKILL at random moments, and each time the store, opened afresh as a restarting node opens it,
must hold only whole entries: every file there and readable, the metadata matching its folder.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from local_node.serving.voice_store import VoiceStore
from tunnel.protocol import KeptVoice

SAMPLES = 24000 * 5  # each sample: 5 s, so a write takes long enough to be cut

CHILD = textwrap.dedent(
    f"""
    import itertools, random, sys
    import numpy as np, torch
    from local_node.serving.voice_store import VoiceStore
    from tunnel.protocol import Consent, KeptVoice

    store = VoiceStore(__import__("pathlib").Path(sys.argv[1]))
    print("ready", flush=True)
    for n in itertools.count(int(sys.argv[2])):
        sample = np.random.default_rng(n).uniform(-0.5, 0.5, {SAMPLES}).astype(np.float32)
        prompt = {{"ref_spk_embedding": torch.randn(512), "ref_code": torch.randint(0, 2048, (300, 16)), "icl_mode": True}}
        store.add_voice(KeptVoice(f"voice_{{n:08x}}", f"v{{n}}", n), "words", sample, {{"base": ("src", prompt), "big": ("src", prompt)}})
        store.add_consent(Consent(f"cons_{{n:08x}}", f"c{{n}}", "en-US", n), sample[:24000])
        kept = sorted(store.voices)
        if len(kept) > 3:
            store.remove("voice", random.choice(kept))
            store.remove("consent", random.choice(sorted(store.consents)))
        store.rename_consent(random.choice(sorted(store.consents)), f"renamed {{n}}")
        store.save_prompt(random.choice(sorted(store.voices)), "late", "src", prompt)
    """
)


def check_whole(folder: Path) -> VoiceStore:
    store = VoiceStore(folder)  # as a restarting node opens it
    assert list((folder / ".incoming").iterdir()) == []
    assert set(store.voices) == {p.name for p in (folder / "voices").iterdir()}
    assert set(store.consents) == {p.name for p in (folder / "consents").iterdir()}
    for voice_id in store.voices:
        with wave.open(str(folder / "voices" / voice_id / "sample.wav")) as sample:
            assert sample.getnframes() == SAMPLES
        for model in ("base", "big"):
            prompt = store.prompt(voice_id, model, "src")
            assert prompt is not None and prompt["ref_code"].shape == (300, 16)
        late = store.prompt(voice_id, "late", "src")  # written later, alone: whole or absent
        assert late is None or late["ref_spk_embedding"].shape == (512,)
        assert {p.name for p in (folder / "voices" / voice_id).iterdir()} <= {
            "voice.json",
            "sample.wav",
            "prompt-base.pt",
            "prompt-big.pt",
            "prompt-late.pt",
        }
    for consent_id in store.consents:
        with wave.open(str(folder / "consents" / consent_id / "recording.wav")) as recording:
            assert recording.getnframes() == 24000
    return store


def test_a_store_killed_at_any_moment_keeps_only_whole_entries(tmp_path):
    folder, rng, first = tmp_path / "voices", random.Random(7), 0
    kept_any = False
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(first)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        try:
            child.wait(timeout=rng.uniform(0.05, 0.6))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL  # killed mid-work, never finished
        store = check_whole(folder)
        kept_any |= bool(store.voices)
        first += 1000  # fresh ids for the next run
    assert kept_any  # the runs got far enough to keep something


def test_entries_are_private_and_ids_cannot_leave_the_folder(tmp_path):
    store = VoiceStore(tmp_path / "v")
    store.add_voice(KeptVoice("voice_1", "One", 1), None, np.zeros(2400, np.float32), {"base": ("s", {"x": torch.zeros(2)})})
    for path in [tmp_path / "v", tmp_path / "v" / "voices" / "voice_1", *(tmp_path / "v" / "voices" / "voice_1").iterdir()]:
        assert path.stat().st_mode & 0o077 == 0, path
    for bad in ("../../etc", "voice_1/../x", "voice_", "cons_a b"):
        assert store.remove("voice", bad) is False
        with pytest.raises(ValueError):
            store.prompt(bad, "base", "s")
    assert VoiceStore(tmp_path / "v").voices == {"voice_1": KeptVoice("voice_1", "One", 1)}
