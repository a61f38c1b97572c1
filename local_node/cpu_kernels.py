"""Our matrix products for CPUs with AVX-512 BF16 and VBMI (``cpu_kernels.c``), and the layouts they read.

``cpu_kernels.c`` is built with the system's C compiler on first use (about a second) and cached in
``~/.cache/qwen3-tts-node``; ctypes releases the GIL during a call, so the node's generation and
decoding threads still run side by side. Where it cannot run (another CPU, no compiler) the
layouts come back None and callers keep PyTorch's kernels:

* ``bf16_layout`` / ``bf16_linear``: bfloat16 weights, bit for bit what oneDNN computes (and so
  what qwen-tts computes), checked on each weight shape before it is used;
* ``int8_layout`` / ``int8_linear``: int8 weights with a float32 scale per row (``weights: int8``);
* ``rms_norm``: the decoder layers' RMS norms (and the rotation of q and k) in one call instead of
  a dozen PyTorch ops, each op rounded as PyTorch rounds it;
* ``attend_one``: attention for one new position (cache write included) in one call instead of
  SDPA's per-head set-up and the half-dozen ops around it: in float32 for int8 models, and in
  bfloat16 rounded as SDPA's kernel rounds (checked at load) for the others.

A product shares its rows among ``use_cores`` threads (one core alone does not draw all the memory
bandwidth there is); a decoder working ``with reserved(cores)`` keeps that many cores for itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_EXACT_POSITIONS = 512  # SDPA's CPU kernel takes keys in blocks of 512: beyond one, attend_one leaves it to SDPA

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi")


def available() -> bool:
    """Whether ``cpu_kernels.c`` runs here: a CPU with AVX-512 BF16 and VBMI and a C compiler that built it."""
    return _library() is not None


def bf16_layout(weight: torch.Tensor) -> torch.Tensor | None:
    """A bfloat16 weight [N, K] in ``bf16_linear``'s layout, or None where that kernel cannot run
    or does not reproduce ``F.linear`` bit for bit on this shape."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or n % 16 or k % 2 or _onednn_blocks(n, k) is None:
        return None
    return _blocked(weight.detach())


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """``F.linear(x, w)`` for x [..., K] bfloat16 and w in ``bf16_layout``, summing k in ``blocks``
    (for one row, for several; oneDNN's, by default)."""
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    one, several = blocks or _onednn_blocks(n, k)
    out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    _library().bf16_linear(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], n, k, _group(n),
                           one if rows.shape[0] == 1 else several)
    return out.view(*x.shape[:-1], n)


def int8_layout(weight: torch.Tensor) -> torch.Tensor | None:
    """An int8 weight [N, K] (values in -127..127) in ``int8_linear``'s layout, or None where that
    kernel cannot run. As ``_blocked``, then each 64 bytes (two blocks of 16 rows) in the order
    cpu_kernels.c's ``load_int8`` widens them, each byte sign | magnitude."""
    n, k = weight.shape
    if _library() is None or n % 32 or k % 2:
        return None
    if int(weight.min()) < -127:  # sign | magnitude has no -128
        raise ValueError("int8 weights for int8_layout must be in -127..127")
    blocked = _blocked(weight.detach()).view(n // 32, k // 2, 2, 4, 8).transpose(2, 3)  # per 16-byte lane: 8 + 8
    return (blocked.abs() | (blocked & -128)).contiguous().view(n, k)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16(scale * (x @ w.T)) for x [..., K] bfloat16, w in ``int8_layout``, scale float32 [N]."""
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    _library().q8_linear(rows.data_ptr(), weight.data_ptr(), scale.data_ptr(), out.data_ptr(), rows.shape[0], n, k, _group(n))
    return out.view(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor | None = None,
             sin: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen3TTSRMSNorm over the last dimension of bfloat16 x [..., dim], weight [dim]; or of x
    [..., heads, dim] with a weight row per head, weight [heads, dim]. With cos and sin (bfloat16,
    [..., dim], one row per position: x's dimensions before the heads), the result rotated too:
    y * cos + rotate_half(y) * sin. Each op rounds as PyTorch's does; its sums take PyTorch's
    order, which callers check per size (decoder_stack). dim <= 4096; returns a new tensor."""
    dim = x.shape[-1]
    heads = weight.shape[0] if weight.dim() == 2 else 1
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not weight.is_contiguous() or dim > 4096:
        raise ValueError("rms_norm takes bfloat16 x and a contiguous bfloat16 weight, dim <= 4096")
    rows = x.reshape(-1, heads, dim)
    if rows.stride(2) != 1 or (heads > 1 and rows.stride(1) != dim):
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    rotation = (None, None)
    if cos is not None:
        if not (cos.dtype == sin.dtype == torch.bfloat16 and cos.is_contiguous() and sin.is_contiguous()
                and cos.numel() == sin.numel() == rows.shape[0] * dim):
            raise ValueError("cos and sin: contiguous bfloat16, one row of dim per position")
        rotation = (cos.data_ptr(), sin.data_ptr())
    _library().rms_norm(rows.data_ptr(), rows.stride(0), heads, weight.data_ptr(), out.data_ptr(), rows.shape[0] * heads,
                        dim, eps, *rotation)
    return out


def attend_one(qk: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: list[int],
               starts: list[int], scale: float) -> torch.Tensor:
    """Attention for one new position per sequence, grouped-query heads: ``rows[j]``'s new key
    (the last kv heads of ``qk`` [n, 1, heads + kv_heads, dim], normed and rotated) and value
    (``v`` [n, 1, kv_heads, dim]), bfloat16, are written at position ``starts[j]`` of cache row
    ``rows[j]`` of ``keys`` / ``values`` ([cache rows, kv_heads, capacity, dim]), then its query
    heads attend over positions 0..starts[j]. Returns [n, 1, heads * dim] bfloat16.

    float32 caches: SDPA's float32 arithmetic, not its rounding. bfloat16 caches: SDPA's bfloat16
    kernel's rounding, bit for bit where ``decoder_stack`` has checked it, for starts[j] <
    ``MAX_EXACT_POSITIONS``. dim a multiple of 16, at most 512."""
    n, _, all_heads, dim = qk.shape
    cache_rows, kv_heads, capacity, _ = keys.shape
    heads = all_heads - kv_heads
    as_sdpa = keys.dtype == torch.bfloat16  # else float32
    shapes = (heads > 0 and heads % kv_heads == 0 and dim % 16 == 0 and dim <= 512 and keys.shape == values.shape
              and keys.shape[3] == dim and v.shape == (n, 1, kv_heads, dim) and len(rows) == len(starts) == n
              and 0 <= min(rows) <= max(rows) < cache_rows and 0 <= min(starts) <= max(starts) < capacity
              and (not as_sdpa or max(starts) < MAX_EXACT_POSITIONS))
    layouts = (qk.dtype == v.dtype == torch.bfloat16 and keys.dtype == values.dtype in (torch.float32, torch.bfloat16)
               and qk.is_contiguous() and v[0].is_contiguous() and keys.is_contiguous() and values.is_contiguous())
    if not (shapes and layouts):
        raise ValueError("attend_one: see its docstring for the shapes and dtypes it takes")
    out = torch.empty(n, 1, heads * dim, dtype=torch.bfloat16)
    _library().attend_one(qk.data_ptr(), v.data_ptr(), v.stride(0), keys.data_ptr(), values.data_ptr(), capacity,
                          (ctypes.c_int * n)(*rows), (ctypes.c_int * n)(*starts), n, heads, kv_heads, dim, scale, as_sdpa,
                          out.data_ptr())
    return out


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """x.sum(-1) for float32 x [rows, dim], summed as ``rms_norm`` sums (to check that order against
    torch's)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.float32)
    _library().row_sums(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1])
    return out


def use_cores(cores: int) -> int:
    """Let products run on up to ``cores`` threads (helper threads are started once and kept);
    returns how many they may use."""
    library = _library()
    return 1 if library is None else library.use_cores(cores)


@contextlib.contextmanager
def reserved(cores: int) -> Iterator[None]:
    """While inside, products leave ``cores`` of their cores free (a decoder at work: the audio
    waits for it, so products must not crowd it out)."""
    library = _library()
    if library is None:
        yield
        return
    library.reserve_cores(cores)
    try:
        yield
    finally:
        library.reserve_cores(-cores)


def _group(n: int) -> int:
    return 4 if n % 64 == 0 else 2 if n % 32 == 0 else 1


def _blocked(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> per block of 16 g rows, per pair of columns, 16 rows' pairs (cpu_kernels.c)."""
    n, k = weight.shape
    g = _group(n)
    return weight.reshape(n // (16 * g), g, 16, k // 2, 2).permute(0, 3, 1, 2, 4).contiguous().view(n, k)


@functools.cache
def _onednn_blocks(n: int, k: int) -> tuple[int, int] | None:
    """The k block sizes (one row of x, several) with which ``bf16_linear`` equals ``F.linear``
    bit for bit on [n, k] weights, or None. oneDNN sums k in blocks whose size its heuristics
    pick by shape and row count (on this project's AVX-512 BF16 machine: 512 for one row; 512 or
    1024 for several); rather than copy those rules, each shape is tried against it once."""
    if _library() is None:
        return None
    generator = torch.Generator().manual_seed(n * 100003 + k)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(torch.bfloat16)
    blocked = _blocked(weight)
    candidates = list(dict.fromkeys(min(size, k) for size in (512, 1024, 256, 2048, k)))
    found = []
    # Enough outputs that a wrong block size shows (it changes about one output in 5000).
    for row_counts in ((1,) * 32, (3, 64)):
        xs = [torch.randn(rows, k, generator=generator).to(torch.bfloat16) for rows in row_counts]
        wanted = [F.linear(x, weight) for x in xs]
        size = next((c for c in candidates if all(torch.equal(bf16_linear(x, blocked, (c, c)), want)
                                                  for x, want in zip(xs, wanted))), None)
        if size is None:
            log.info("bfloat16 [%d, %d] products stay with oneDNN: no block size rounds as it does here", n, k)
            return None
        found.append(size)
    return found[0], found[1]


@functools.cache
def _library() -> Any:
    """The built ``cpu_kernels.c``, or None where it cannot run."""
    if not (platform.machine().lower() in ("x86_64", "amd64") and torch.cpu._is_avx512_bf16_supported()):
        return None
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not build %s (%s): PyTorch's kernels instead, slower for one row", SOURCE.name, e)
        return None
    if not library.supported():
        return None
    library.bf16_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5
    library.q8_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
    library.use_cores.argtypes = library.reserve_cores.argtypes = [ctypes.c_int]
    library.rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    library.rms_norm.restype = library.row_sums.restype = None
    library.row_sums.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    library.attend_one.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4 + [
                                   ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
    library.attend_one.restype = None
    library.bf16_linear.restype = library.q8_linear.restype = library.reserve_cores.restype = None
    return library


def _build() -> Path:
    """Compile once per source and flags; the result is renamed into place whole, so processes
    starting together never load a half-written file."""
    compiler = os.environ.get("CC", "cc")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-tts-node"
    built = cache / f"cpu_kernels-{digest}.so"
    if not built.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            partial = Path(scratch) / built.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True, timeout=120)
            os.replace(partial, built)
    return built
