"""Which kernel tier the node may use: ``QWEN3_TTS_ISA``, and the vendor libraries capped to match.

Standard library only: the node reads this before it imports torch, because oneDNN and ATen read
their own caps (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``) once, when torch first uses them.

Tiers, best first: ``amx`` (AVX-512 BF16 kernels; oneDNN keeps AMX for the codec and other
many-row products), ``avx512_bf16``, ``avx512``, ``avx2`` (x86-64 with AVX2 and FMA), ``neon``
(aarch64), and ``portable`` (no compiled code of ours: PyTorch's kernels only). ``native`` (the
default) takes the best this CPU has; a named tier caps the choice there.
"""

from __future__ import annotations

import os

TIERS = ("amx", "avx512_bf16", "avx512", "avx2", "neon", "portable")

# A named x86 tier also caps oneDNN and ATen, so that this machine runs as one that has only that
# tier (an AVX2 box emulated on an AVX-512 one). Set only where the user has not set them.
VENDOR_CAPS = {
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


class TierError(ValueError):
    """QWEN3_TTS_ISA names no tier."""


def requested() -> str:
    """``QWEN3_TTS_ISA``: ``native`` or one of ``TIERS``."""
    value = os.environ.get("QWEN3_TTS_ISA", "native").strip().lower() or "native"
    if value != "native" and value not in TIERS:
        raise TierError(f"QWEN3_TTS_ISA={value!r} is not a tier: use native or one of {', '.join(TIERS)}")
    return value


def cap_vendor_libraries() -> dict[str, str]:
    """Set the oneDNN and ATen caps that match the requested tier, where not already set; returns
    what was set. Call before torch is imported."""
    applied = {}
    for name, value in VENDOR_CAPS.get(requested(), {}).items():
        if name not in os.environ:
            os.environ[name] = applied[name] = value
    return applied
