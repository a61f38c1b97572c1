"""Import qwen_tts on a CPU-only torch.

qwen-tts 0.1.1 imports ``torchaudio.compliance.kaldi`` at import time, for its 25 Hz speech
tokenizer only; the 12 Hz models this project serves never call it. The registry's torchaudio
wheel is built against a CUDA torch and raises OSError when loaded next to the CPU build of
torch 2.13, and there is no CPU build of torchaudio to install instead. So when the real module
cannot load, we register a stand-in that fails loudly if anything ever calls into it, and then
import qwen_tts normally. A working torchaudio, where there is one, is used as is.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import sys
import types
from typing import Iterator

_KALDI = "torchaudio.compliance.kaldi"


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so submodules can hang off it
    # transformers probes optional packages with importlib.util.find_spec, which needs a spec.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)

    def unavailable(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(
            f"{name}.{attr} is unavailable: torchaudio could not load with this torch build. "
            "Only the 25 Hz Qwen3-TTS tokenizer needs it; the 12 Hz models do not."
        )

    module.__getattr__ = unavailable  # type: ignore[method-assign]
    return module


def _ensure_kaldi_importable() -> None:
    try:
        importlib.import_module(_KALDI)
        return
    except (ImportError, OSError, RuntimeError):
        pass
    for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
        del sys.modules[name]  # drop what a half-failed import left behind
    parent = None
    for name in ("torchaudio", "torchaudio.compliance", _KALDI):
        module = _stand_in(name)
        sys.modules[name] = module
        if parent is not None:
            setattr(parent, name.rsplit(".", 1)[1], module)
        parent = module


def import_qwen_tts() -> types.ModuleType:
    """Return the qwen_tts package, importable whether or not torchaudio loads."""
    _ensure_kaldi_importable()
    if "qwen_tts" in sys.modules:
        return sys.modules["qwen_tts"]
    # The 25 Hz modules also print a flash-attn notice and probe for the SoX binary through a
    # shell at import time. Neither concerns the 12 Hz models, so that noise is discarded;
    # an import error still propagates.
    with _silenced_fds():
        return importlib.import_module("qwen_tts")


@contextlib.contextmanager
def _silenced_fds() -> Iterator[None]:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
