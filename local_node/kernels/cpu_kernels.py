"""The node's own kernels (``cpu_kernels.c``), one build per tier, and the layouts they read.

A tier (``tiers.py``) is a set of compiler flags for the one source: the same arithmetic with the
vector instructions of one kind of CPU. ``active()`` is the tier the node runs: the best this
CPU supports, capped by ``QWEN3_TTS_ISA``; ``kernels(tier)`` loads any tier this CPU can run (the
tests compare them). Where none can run (no compiler, another architecture, ``portable``) callers
keep PyTorch's kernels.

Each build is compiled with the system's C compiler on first use (about a second) and cached in
``~/.cache/qwen3-tts-node``; ctypes releases the GIL during a call, so the node's generation and
decoding threads still run side by side. What a ``Kernels`` offers:

* ``bf16_layout`` / ``bf16_linear``: bfloat16 weights, float32 sums, one rounding to bfloat16;
* ``int8_layout`` / ``int8_linear``: int8 weights with a float32 scale per row (``weights: int8``);
* ``rms_norm``: the decoder layers' RMS norms (and the rotation of q and k) in one call instead of
  a dozen PyTorch ops, rounded to bfloat16 where those ops round;
* ``attend_one``: attention for one new position, cache write included, in one call instead of
  SDPA's per-head set-up and the half-dozen ops around it; float32 arithmetic;
* ``stack_step``: all of a stack's decoder layers for one new position in one call, the same
  arithmetic as the calls above and the ops between them, without a dozen dispatches per layer;
* ``read_seconds``: the machine's streaming read speed, which the products are bound by (bench).

These define the node's numbers; ``tests/test_cpu_kernels.py`` holds every tier to PyTorch's
results by stated tolerances. A product shares its rows among ``use_cores`` threads (one core alone
does not draw all the memory bandwidth there is); a decoder working ``with reserved(cores)``
keeps that many cores for itself.
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
from typing import Any, Iterator, Sequence

import torch

from local_node.kernels import tiers

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
COMMON_FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=fast", "-fno-math-errno")
AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma")
BUILDS = {  # tier -> its build's flags; amx runs the avx512_bf16 build
    "avx512_bf16": (*AVX512, "-mavx512bf16", "-mavx512vbmi"),
    "avx512": AVX512,
    "avx2": ("-mavx2", "-mfma"),
    "neon": (),
}
ARCHITECTURE_TIERS = {"x86_64": ("amx", "avx512_bf16", "avx512", "avx2"), "aarch64": ("neon",)}
MAX_DIM = 4096  # cpu_kernels.c: rows of rms_norm, head size of attend_one


class Kernels:
    """One tier's build of cpu_kernels.c, loaded and checked to run on this CPU."""

    def __init__(self, tier: str, library: Any) -> None:
        self.tier, self._library = tier, library
        self.lanes = library.lanes()  # floats per vector: a block of weight rows is 1, 2 or 4 vectors
        self.int8_sign_magnitude = bool(library.int8_sign_magnitude())

    def __repr__(self) -> str:
        return f"Kernels({self.tier!r})"

    # --- products --------------------------------------------------------------------------

    def bf16_layout(self, weight: torch.Tensor) -> torch.Tensor | None:
        """A bfloat16 weight [N, K] laid out for ``bf16_linear``, or None for shapes it does not take."""
        n, k = weight.shape
        if weight.dtype != torch.bfloat16 or n % 16 or k % 2:
            return None
        return _blocked(weight.detach(), self._block_rows(n))

    def bf16_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, w)`` for x [..., K] bfloat16 and w from ``bf16_layout``: float32 sums
        rounded once."""
        n, k = weight.shape
        rows = _rows(x, k)
        out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
        self._library.bf16_linear(
            rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], n, k, self._block_rows(n) // self.lanes
        )
        return out.view(*x.shape[:-1], n)

    def int8_layout(self, weight: torch.Tensor) -> torch.Tensor | None:
        """An int8 weight [N, K] (values in -127..127) laid out for ``int8_linear``, or None for
        shapes it does not take. As ``bf16_layout``, then the columns of each pair apart; on the
        AVX-512 BF16 build instead each 64 bytes (two vectors of 16 rows) in the order its table
        lookup widens them, each byte sign | magnitude (cpu_kernels.c: load_int8_pair)."""
        n, k = weight.shape
        if n % (32 if self.int8_sign_magnitude else 16) or k % 2:
            return None
        if int(weight.min()) < -127:  # no place for -128 in sign | magnitude; the quantizer clamps to ±127
            raise ValueError("int8 weights for int8_layout must be in -127..127")
        block = self._block_rows(n)
        blocked = _blocked(weight.detach(), block)
        if not self.int8_sign_magnitude:
            return blocked.view(n // block, k // 2, block, 2).transpose(2, 3).contiguous().view(n, k)
        lanes = blocked.view(n // 32, k // 2, 2, 4, 8).transpose(2, 3)  # per 16-byte lane: 8 + 8
        return (lanes.abs() | (lanes & -128)).contiguous().view(n, k)

    def int8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """bf16(scale * (x @ w.T)) for x [..., K] bfloat16, w from ``int8_layout``, scale float32 [N]."""
        n, k = weight.shape
        rows = _rows(x, k)
        out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
        self._library.q8_linear(
            rows.data_ptr(), weight.data_ptr(), scale.data_ptr(), out.data_ptr(), rows.shape[0], n, k, self._block_rows(n) // self.lanes
        )
        return out.view(*x.shape[:-1], n)

    def _block_rows(self, n: int) -> int:
        """Rows per block of the layout: the most of 4 vectors, 2, 1 that divides n (at least 16)."""
        return next(r for r in (4 * self.lanes, 2 * self.lanes, self.lanes, 16) if r >= 16 and n % r == 0)

    # --- norms and attention ------------------------------------------------------------------

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Qwen3TTSRMSNorm over the last dimension of bfloat16 x [..., dim], weight [dim]; or of x
        [..., heads, dim] with a weight row per head, weight [heads, dim]. With cos and sin
        (bfloat16, [..., dim], one row per position: x's dimensions before the heads), the result
        rotated too: y * cos + rotate_half(y) * sin. dim <= 4096; returns a new tensor."""
        dim = x.shape[-1]
        heads = weight.shape[0] if weight.dim() == 2 else 1
        if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not weight.is_contiguous() or dim > MAX_DIM:
            raise ValueError("rms_norm takes bfloat16 x and a contiguous bfloat16 weight, dim <= 4096")
        rows = x.reshape(-1, heads, dim)
        if rows.stride(2) != 1 or (heads > 1 and rows.stride(1) != dim):
            rows = rows.contiguous()
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        rotation = (None, None)
        if cos is not None:
            if not (
                sin is not None
                and cos.dtype == sin.dtype == torch.bfloat16
                and cos.is_contiguous()
                and sin.is_contiguous()
                and cos.numel() == sin.numel() == rows.shape[0] * dim
            ):
                raise ValueError("cos and sin: contiguous bfloat16, one row of dim per position")
            rotation = (cos.data_ptr(), sin.data_ptr())
        self._library.rms_norm(
            rows.data_ptr(), rows.stride(0), heads, weight.data_ptr(), out.data_ptr(), rows.shape[0] * heads, dim, eps, *rotation
        )
        return out

    def attend_one(
        self, qk: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: list[int], starts: list[int], scale: float
    ) -> torch.Tensor:
        """Attention for one new position per sequence, grouped-query heads: ``rows[j]``'s new key
        (the last kv heads of ``qk`` [n, 1, heads + kv_heads, dim], normed and rotated) and value
        (``v`` [n, 1, kv_heads, dim]), bfloat16, are written at position ``starts[j]`` of cache row
        ``rows[j]`` of ``keys`` / ``values`` ([cache rows, kv_heads, capacity, dim], bfloat16 or
        float32), then its query heads attend over positions 0..starts[j], in float32. Returns
        [n, 1, heads * dim] bfloat16. dim a multiple of 16, at most 4096."""
        n, _, all_heads, dim = qk.shape
        cache_rows, kv_heads, capacity, _ = keys.shape
        heads = all_heads - kv_heads
        shapes = (
            heads > 0
            and heads % kv_heads == 0
            and dim % 16 == 0
            and dim <= MAX_DIM
            and keys.shape == values.shape
            and keys.shape[3] == dim
            and v.shape == (n, 1, kv_heads, dim)
            and len(rows) == len(starts) == n
            and 0 <= min(rows) <= max(rows) < cache_rows
            and 0 <= min(starts) <= max(starts) < capacity
        )
        layouts = (
            qk.dtype == v.dtype == torch.bfloat16
            and keys.dtype == values.dtype in (torch.float32, torch.bfloat16)
            and qk.is_contiguous()
            and v[0].is_contiguous()
            and keys.is_contiguous()
            and values.is_contiguous()
        )
        if not (shapes and layouts):
            raise ValueError("attend_one: see its docstring for the shapes and dtypes it takes")
        out = torch.empty(n, 1, heads * dim, dtype=torch.bfloat16)
        self._library.attend_one(
            qk.data_ptr(),
            v.data_ptr(),
            v.stride(0),
            keys.data_ptr(),
            values.data_ptr(),
            capacity,
            (ctypes.c_int * n)(*rows),
            (ctypes.c_int * n)(*starts),
            n,
            heads,
            kv_heads,
            dim,
            scale,
            keys.dtype == torch.bfloat16,
            out.data_ptr(),
        )
        return out

    # --- whole decoder layers --------------------------------------------------------------

    def layer_table(self, layers: list[dict[str, Any]]) -> Any | None:
        """What ``stack_step`` reads of each decoder layer, or None unless every product of every
        layer runs on these kernels. Each layer: the modules ``qkv``, ``o``, ``gate_up`` and
        ``down`` (PackedLinear or Int8Linear laid out for these kernels), the bfloat16 norm weights
        ``input_norm``, ``post_norm``, ``qk_norm`` ([heads + kv_heads, dim], contiguous), and
        ``norm_eps``, ``qk_eps``, ``scale``. The tensors must outlive the table."""
        table = (_Layer * len(layers))()
        for entry, layer in zip(table, layers):
            for name in ("qkv", "o", "gate_up", "down"):
                module = layer[name]
                if getattr(module, "kernels", None) is not self:
                    return None
                scale = getattr(module, "scale", None)
                setattr(
                    entry,
                    name,
                    _Product(
                        module.weight.data_ptr(),
                        None if scale is None else scale.data_ptr(),
                        self._block_rows(module.out_features) // self.lanes,
                    ),
                )
            for name in ("input_norm", "post_norm", "qk_norm"):
                if layer[name].dtype != torch.bfloat16 or not layer[name].is_contiguous():
                    return None
                setattr(entry, name, layer[name].data_ptr())
            entry.norm_eps, entry.qk_eps, entry.scale = layer["norm_eps"], layer["qk_eps"], layer["scale"]
        return table

    def stack_step(
        self,
        table: Any,
        x: torch.Tensor,
        heads: int,
        kv_heads: int,
        intermediate: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: list[int],
        starts: list[int],
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """x [n, 1, hidden] bfloat16, one new position per sequence, through every layer of
        ``table`` in one call (cpu_kernels.c: stack_step): the per-op path's arithmetic, each
        sequence's key and value written at ``starts[j]`` of cache row ``rows[j]`` of ``keys`` /
        ``values`` ([layers, cache rows, kv_heads, capacity, dim], bfloat16). Returns a new tensor."""
        n, steps, hidden = x.shape
        layers, cache_rows, kv, capacity, dim = keys.shape
        if not (
            steps == 1
            and x.dtype == keys.dtype == values.dtype == torch.bfloat16
            and keys.shape == values.shape
            and layers == len(table)
            and kv == kv_heads
            and heads % kv_heads == 0
            and dim % 16 == 0
            and max(dim, hidden) <= MAX_DIM
            and keys.is_contiguous()
            and values.is_contiguous()
            and len(rows) == len(starts) == n
            and 0 <= min(rows) <= max(rows) < cache_rows
            and 0 <= min(starts) <= max(starts) < capacity
            and cos.is_contiguous()
            and sin.is_contiguous()
            and cos.numel() == sin.numel() == n * dim
            and cos.dtype == sin.dtype == torch.bfloat16
        ):
            raise ValueError("stack_step: see its docstring for the shapes and dtypes it takes")
        out = x.contiguous().clone()
        self._library.stack_step(
            table,
            len(table),
            out.data_ptr(),
            n,
            hidden,
            heads,
            kv_heads,
            dim,
            intermediate,
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(0),
            capacity,
            (ctypes.c_int * n)(*rows),
            (ctypes.c_int * n)(*starts),
            cos.data_ptr(),
            sin.data_ptr(),
            1,
        )
        return out

    # --- threads and the machine ------------------------------------------------------------

    def use_cores(self, cores: int) -> int:
        """Let products run on up to ``cores`` threads (helper threads are started once and kept);
        returns how many they may use."""
        return self._library.use_cores(cores)

    @contextlib.contextmanager
    def reserved(self, cores: int) -> Iterator[None]:
        """While inside, products leave ``cores`` of their cores free (a decoder at work: the audio
        waits for it, so products must not crowd it out)."""
        self._library.reserve_cores(cores)
        try:
            yield
        finally:
            self._library.reserve_cores(-cores)

    def read_bandwidth(self, threads: Sequence[int], repeats: int = 5) -> dict[int, float]:
        """Streaming read bandwidth in GB/s on each of ``threads`` thread counts: the best of
        ``repeats`` reads of 2 GiB (well past any cache)."""
        buffer = torch.ones(2 << 30, dtype=torch.uint8)  # written, so its pages are real
        aligned = buffer[(-buffer.data_ptr()) % 64 :][: (2 << 30) - 256]
        return {n: aligned.nbytes / min(self.read_seconds(aligned, n) for _ in range(repeats)) / 1e9 for n in threads}

    def read_seconds(self, buffer: torch.Tensor, threads: int) -> float:
        """Seconds to stream through ``buffer`` (contiguous, 64-byte aligned, a multiple of 256
        bytes) on ``threads`` threads."""
        if not buffer.is_contiguous() or buffer.data_ptr() % 64 or buffer.nbytes % 256:
            raise ValueError("read_seconds: a contiguous, 64-byte aligned buffer of a multiple of 256 bytes")
        return self._library.read_seconds(buffer.data_ptr(), buffer.nbytes, threads)


def active() -> Kernels | None:
    """The kernels the node runs (``QWEN3_TTS_ISA`` and this CPU decide), or None: PyTorch's."""
    return choice()[0]


def active_tier() -> str:
    """The name of the tier the node runs, ``portable`` included."""
    kernels = active()
    return "portable" if kernels is None else kernels.tier


@functools.cache
def choice() -> tuple[Kernels | None, str]:
    """The node's kernels and why those: the best tier this CPU runs, from the one asked for down."""
    asked = tiers.requested()
    machine = _machine()
    candidates = ARCHITECTURE_TIERS.get(machine, ())
    if asked != "native":
        if asked == "portable":
            return None, "QWEN3_TTS_ISA=portable: PyTorch's kernels only"
        if asked not in candidates:
            return None, f"QWEN3_TTS_ISA={asked} does not run on {machine}: PyTorch's kernels only"
        candidates = candidates[candidates.index(asked) :]
    skipped = []
    for tier in candidates:
        found = kernels(tier)
        if found is not None:
            lacks = f"this CPU lacks {', '.join(skipped)}" if skipped else ""
            if asked == "native":
                return found, lacks or "the best this CPU runs"
            return found, f"QWEN3_TTS_ISA={asked}" + (f"; {lacks}" if lacks else "")
        skipped.append(tier)
    if not candidates:
        return None, f"no kernels of ours for {machine}: PyTorch's kernels only"
    return None, f"none of {', '.join(candidates)} runs here (CPU or C compiler; see above): PyTorch's kernels only"


@functools.cache
def kernels(tier: str) -> Kernels | None:
    """``tier``'s kernels where this CPU runs them (built on first use), else None."""
    if tier == "amx":
        if not torch.cpu._is_amx_tile_supported():
            return None
        base = kernels("avx512_bf16")
        return None if base is None else Kernels("amx", base._library)
    if tier not in machine_tiers():
        return None
    try:
        library = ctypes.CDLL(str(_build(tier)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning(
            "could not build the %s kernels (%s%s): %s",
            tier,
            e,
            f": {detail.decode(errors='replace')[-300:]}" if detail else "",
            "a lower tier, or PyTorch's kernels",
        )
        return None
    if not library.supported():
        return None
    _declare(library)
    return Kernels(tier, library)


class _Product(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("vectors", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Product),
        ("o", _Product),
        ("gate_up", _Product),
        ("down", _Product),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qk_norm", ctypes.c_void_p),
        ("norm_eps", ctypes.c_float),
        ("qk_eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


def machine_tiers() -> tuple[str, ...]:
    """The tiers of this machine's architecture, best first (none where we have no kernels)."""
    return ARCHITECTURE_TIERS.get(_machine(), ())


def _machine() -> str:
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def _declare(library: Any) -> None:
    p, i, f, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
    library.bf16_linear.argtypes = [p] * 3 + [i] * 4
    library.q8_linear.argtypes = [p] * 4 + [i] * 4
    library.use_cores.argtypes = library.reserve_cores.argtypes = [i]
    library.rms_norm.argtypes = [p, long, i, p, p, i, i, f, p, p]
    library.attend_one.argtypes = [p, p, long, p, p, long, p, p, i, i, i, i, f, i, p]
    library.stack_step.argtypes = [p, i, p] + [i] * 6 + [p, p, long, long, p, p, p, p, i]
    library.read_seconds.argtypes = [p, long, i]
    library.read_seconds.restype = ctypes.c_double
    for name in ("bf16_linear", "q8_linear", "reserve_cores", "rms_norm", "attend_one", "stack_step"):
        getattr(library, name).restype = None


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise ValueError(f"products take bfloat16 x [..., {k}]")
    return x.reshape(-1, k).contiguous()


def _blocked(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] -> per block of ``block`` rows, per pair of columns, the block's rows' pairs."""
    n, k = weight.shape
    return weight.reshape(n // block, block, k // 2, 2).transpose(1, 2).contiguous().view(n, k)


def _build(tier: str) -> Path:
    """Compile ``tier`` once per source, compiler and flags; the result is renamed into place
    whole, so processes starting together never load a half-written file."""
    compiler = os.environ.get("CC", "cc")
    flags = (*COMMON_FLAGS, *BUILDS[tier])
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-tts-node"
    built = cache / f"cpu_kernels-{tier}-{digest}.so"
    if not built.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            partial = Path(scratch) / built.name
            subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial), "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(partial, built)
    return built
