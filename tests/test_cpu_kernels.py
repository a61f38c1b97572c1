"""The node's kernels (cpu_kernels.c), every tier this CPU runs, against plain arithmetic.

The kernels define the node's numbers, so they are held to what the arithmetic should give, with
stated tolerances, not to another library's rounding:

* products: float32 sums rounded once to bfloat16. Each output is within half a bfloat16 step of
  the exact sum (computed in float64) plus the float32 rounding of the sum, which is at most
  K * 2^-24 of the sum of the terms' magnitudes; 2^-11 of it covers K <= 8192. A row's output is
  the same bit for bit whichever other rows share the call and whichever thread computes it.
* norms: the sum of squares in float32 in another order than PyTorch's moves the scale by an ulp or
  two, so the normalised value may round one bfloat16 step apart from Qwen3TTSRMSNorm's, and its
  product with the weight, rounded again, up to two steps (2^-6 relative); rarely.
* attention: float32 arithmetic, one rounding to bfloat16 at the end: within 2^-7 relative plus
  1e-3 of float32 SDPA.

Tiers this CPU lacks are skipped (conftest prints which ran). Int8 products: test_int8.py.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import TIERS_RUN, TIERS_SKIPPED

from local_node.kernels import cpu_kernels
from local_node.model.decoder_stack import _rms_norm, _rotate_half
from local_node.model.packing import PackedLinear
from local_node.model.qwen_import import import_qwen_tts

# (out, in) of the 0.6B and 1.7B talkers' fused projections and heads, and tiny ones.
SHAPES = [
    (4096, 1024),
    (1024, 2048),
    (6144, 1024),
    (1024, 3072),
    (3072, 1024),
    (2048, 1024),
    (8192, 2048),
    (2048, 4096),
    (12288, 2048),
    (2048, 6144),
    (3072, 2048),
    (32, 64),
    (48, 96),
    (16, 16),
]


def product_error_bound(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the exact products in float64, how far a float32-summed, bf16-rounded result may be from them)."""
    exact = x.double().reshape(-1, x.shape[-1]) @ weight.double().T
    magnitude = x.double().abs().reshape(-1, x.shape[-1]) @ weight.double().abs().T
    return exact, exact.abs() * 2**-8 + magnitude * 2**-11


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_linear_is_the_float32_sum_rounded_once(kernels, shape):
    torch.manual_seed(sum(shape))
    weight = (torch.randn(shape) * 0.05).to(torch.bfloat16)
    laid = kernels.bf16_layout(weight)
    assert laid is not None
    for rows in (1, 2, 4, 17, 33):  # one-row generation steps, batches, prefills
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        got = kernels.bf16_linear(x, laid)
        exact, bound = product_error_bound(x, weight)
        assert ((got.double() - exact).abs() <= bound).all(), rows
        # Each row alone gives exactly what it gives among others (batched utterances rely on it).
        assert torch.equal(kernels.bf16_linear(x[-1:], laid), got[-1:])
    x = torch.randn(3, 5, shape[1], dtype=torch.bfloat16).transpose(0, 1)  # 3-D, not contiguous
    assert torch.equal(kernels.bf16_linear(x, laid), kernels.bf16_linear(x.contiguous(), laid))


def test_the_bound_is_tight_enough_to_catch_a_wrong_sum(kernels):
    """A product that drops one column's terms, or rounds twice, falls outside the bound above."""
    torch.manual_seed(3)
    weight = (torch.randn(1024, 1024) * 0.05).to(torch.bfloat16)
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    exact, bound = product_error_bound(x, weight)
    dropped = F.linear(x[:, 1:].float(), weight[:, 1:].float()).double()
    assert ((dropped - exact).abs() > bound).any()
    got = kernels.bf16_linear(x, kernels.bf16_layout(weight))
    assert ((got.double() - exact).abs() <= bound).all()


def test_packed_linear_uses_the_kernels_where_it_can(kernels):
    plain = torch.nn.Linear(1024, 4096, bias=False).to(torch.bfloat16)
    with_bias = torch.nn.Linear(1024, 4096, bias=True).to(torch.bfloat16)
    odd = torch.nn.Linear(1024, 100, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 1024, dtype=torch.bfloat16)
    for linear, ours in ((plain, True), (with_bias, False), (odd, False)):
        packed = PackedLinear(linear, kernels)
        assert (packed.layout == "ours") is ours and (packed.kernels is kernels) is ours
        torch.testing.assert_close(packed(x), linear(x), rtol=2**-7, atol=1e-2)


def test_packed_linear_without_kernels_is_pytorchs():
    linear = torch.nn.Linear(1024, 4096, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 1024, dtype=torch.bfloat16)
    packed = PackedLinear(linear, None)
    assert packed.kernels is None and packed.layout in ("onednn", "plain")
    torch.testing.assert_close(packed(x), linear(x), rtol=2**-7, atol=1e-2)


def test_products_shared_among_cores_equal_one_core_alone(kernels):
    """Rows split among helper threads (3 shares: uneven splits too), from several threads at
    once while a decoder reserves and frees cores: every product equals the one-thread product."""
    assert kernels.use_cores(3) == 3
    torch.manual_seed(7)
    cases = []
    for n, k in ((4096, 1024), (1024, 3072), (96, 64), (32, 64)):
        weight = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        cases.append((kernels.bf16_layout(weight), kernels.int8_layout(codes), torch.rand(n), k))
    xs = {k: [torch.randn(rows, k, dtype=torch.bfloat16) for rows in (1, 2, 5)] for *_, k in cases}

    def products() -> list[torch.Tensor]:
        return [
            product
            for laid, quantized, scale, k in cases
            for x in xs[k]
            for product in (kernels.bf16_linear(x, laid), kernels.int8_linear(x, quantized, scale))
        ]

    with kernels.reserved(3):
        alone = products()
    assert all(torch.equal(a, b) for a, b in zip(products(), alone))

    failures, stop = [], threading.Event()

    def compute() -> None:
        for _ in range(30):
            if not all(torch.equal(a, b) for a, b in zip(products(), alone)):
                failures.append(threading.current_thread().name)

    def decode() -> None:
        while not stop.is_set():
            with kernels.reserved(1):
                stop.wait(0.0005)

    threads = [threading.Thread(target=compute, name=f"products-{i}") for i in range(3)]
    decoder = threading.Thread(target=decode)
    for thread in (*threads, decoder):
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    stop.set()
    decoder.join()
    assert not failures
    assert not any(thread.is_alive() for thread in threads), "a product never finished"


def test_products_refuse_what_they_cannot_read(kernels):
    laid = kernels.bf16_layout(torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        kernels.bf16_linear(torch.zeros(1, 64), laid)  # float32
    with pytest.raises(ValueError):
        kernels.bf16_linear(torch.zeros(1, 32, dtype=torch.bfloat16), laid)  # wrong width


# --- norms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 7, 2048), (4, 1, 24, 128), (1, 40, 48, 128)])
def test_rms_norm_is_qwen3_tts_rms_norm_within_a_step(kernels, shape):
    """Against Qwen3TTSRMSNorm over magnitudes from 1e-3 to 1e3 and with outliers."""
    import_qwen_tts()
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSRMSNorm

    generator = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    differing = total = 0
    for trial in range(20):
        module = Qwen3TTSRMSNorm(shape[-1], eps=(1e-6, 1e-5)[trial % 2]).to(torch.bfloat16)
        module.weight.data = (torch.randn(shape[-1], generator=generator) * 0.1 + 1).to(torch.bfloat16)
        scale = 10 ** (6 * torch.rand(1, generator=generator).item() - 3)
        outliers = 1 + 20 * (torch.rand(shape, generator=generator) < 0.01)
        x = (torch.randn(shape, generator=generator) * scale * outliers).to(torch.bfloat16)
        got, want = kernels.rms_norm(x, module.weight, module.variance_epsilon), module(x)
        torch.testing.assert_close(got, want, rtol=2**-6, atol=0)
        differing, total = differing + int((got != want).sum()), total + want.numel()
    assert differing <= total * 0.01


def test_rms_norm_with_rotation_is_the_torch_ops_within_a_step(kernels):
    """q and k heads of a fused q/k/v output (strided), a norm weight per head, then the rotary
    embedding, in one call: DecoderStack's torch ops' result within bfloat16 steps."""
    generator = torch.Generator().manual_seed(5)
    n, steps, heads, kv_heads, dim = 2, 5, 16, 8, 128
    for trial in range(10):
        qkv = (torch.randn(n, steps, heads + 2 * kv_heads, dim, generator=generator) * 10 ** (trial % 5 - 2)).to(torch.bfloat16)
        weight = (torch.randn(heads + kv_heads, dim, generator=generator) * 0.2 + 1).to(torch.bfloat16)
        angles = torch.rand(n, 1, steps, dim, generator=generator) * 50
        cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
        want = _rms_norm(qkv[:, :, : heads + kv_heads], weight, 1e-6).transpose(1, 2)
        want = want * cos + _rotate_half(want) * sin
        got = kernels.rms_norm(qkv[:, :, : heads + kv_heads], weight, 1e-6, cos, sin).transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-6)  # a step in each of the two terms


def test_rms_norm_refuses_what_it_cannot_read(kernels):
    weight = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        kernels.rms_norm(torch.ones(2, 16), weight, 1e-6)  # float32
    with pytest.raises(ValueError):
        kernels.rms_norm(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(16, 2, dtype=torch.bfloat16).T[0], 1e-6)


# --- attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, dim", [(16, 8, 128), (2, 1, 32), (4, 4, 64)])
def test_attend_one_is_float32_sdpa_with_the_cache_written(kernels, heads, kv_heads, dim, cache):
    """Attention for one new position: each sequence's new key and value land in its cache row at
    its position, and each query head attends as float32 SDPA (grouped-query) does; lengths that
    are and are not multiples of the vector width, and past 512 (SDPA's first block of keys)."""
    torch.manual_seed(heads * dim)
    keys, values = torch.randn(4, kv_heads, 700, dim).to(cache), torch.randn(4, kv_heads, 700, dim).to(cache)
    want_keys, want_values = keys.clone(), values.clone()
    rows, starts = [2, 0, 3, 1], [0, 15, 16, 650]
    qkv = (torch.randn(4, 1, heads + 2 * kv_heads, dim) * 2).to(torch.bfloat16)
    qk, v = qkv[:, :, : heads + kv_heads].contiguous(), qkv[:, :, heads + kv_heads :]
    got = kernels.attend_one(qk, v, keys, values, rows, starts, dim**-0.5)
    assert got.shape == (4, 1, heads * dim) and got.dtype == torch.bfloat16
    for j, (row, start) in enumerate(zip(rows, starts)):
        want_keys[row, :, start], want_values[row, :, start] = qk[j, 0, heads:].to(cache), v[j, 0].to(cache)
        q = qk[j : j + 1, :, :heads].transpose(1, 2).float()
        want = F.scaled_dot_product_attention(
            q,
            want_keys[row : row + 1, :, : start + 1].float(),
            want_values[row : row + 1, :, : start + 1].float(),
            scale=dim**-0.5,
            enable_gqa=True,
        )
        torch.testing.assert_close(got[j, 0].float(), want.transpose(1, 2).reshape(-1), rtol=2**-7, atol=1e-3)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


def test_attend_one_refuses_what_it_cannot_read(kernels):
    keys = values = torch.zeros(1, 1, 8, 32)
    qkv = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
    qk, v = qkv[:, :, :3].contiguous(), qkv[:, :, 3:]
    kernels.attend_one(qk, v, keys, values, [0], [7], 1.0)  # the last position: fine
    for bad in ([0], [8]), ([1], [0]), ([-1], [0]):  # position past the cache, rows outside it
        with pytest.raises(ValueError):
            kernels.attend_one(qk, v, keys, values, *bad, 1.0)
    with pytest.raises(ValueError):
        kernels.attend_one(qk.float(), v, keys, values, [0], [0], 1.0)
    with pytest.raises(ValueError):
        kernels.attend_one(qk, v, keys.half(), values.half(), [0], [0], 1.0)
    kv2 = torch.zeros(1, 2, 8, 32)
    with pytest.raises(ValueError):  # 1 query head cannot share 2 kv heads
        kernels.attend_one(qk, qkv[:, :, 2:], kv2, kv2, [0], [0], 1.0)


# --- the machine ---------------------------------------------------------------------------------


def test_read_seconds_times_a_read(kernels):
    buffer = torch.ones(64 << 20, dtype=torch.uint8)
    assert 0 < kernels.read_seconds(buffer, 2) < 10
    with pytest.raises(ValueError):
        kernels.read_seconds(buffer[1:], 1)


def test_the_node_runs_the_best_tier_this_cpu_has(monkeypatch):
    """native takes the first tier that runs here; a named tier caps it; portable takes none."""
    runs = [t for t in cpu_kernels.machine_tiers() if cpu_kernels.kernels(t)]
    try:
        for asked, expected in [("native", runs[0] if runs else None), ("portable", None), *[(tier, tier) for tier in runs]]:
            monkeypatch.setenv("QWEN3_TTS_ISA", asked)
            cpu_kernels.choice.cache_clear()
            kernels, why = cpu_kernels.choice()
            assert (kernels.tier if kernels else None) == expected, (asked, why)
            assert why
        monkeypatch.setenv("QWEN3_TTS_ISA", "sse9")
        cpu_kernels.choice.cache_clear()
        with pytest.raises(ValueError, match="not a tier"):
            cpu_kernels.choice()
    finally:
        monkeypatch.undo()
        cpu_kernels.choice.cache_clear()


def test_the_aarch64_build_passes_its_self_test_under_qemu(tmp_path):
    """The neon tier from the same source, cross-compiled and run under qemu-user: its products,
    int8 products and attention against double-precision sums (cpu_kernels.c: SELF_TEST).
    Debian's gcc-aarch64-linux-gnu and qemu-user provide the tools."""
    import shutil
    import subprocess

    compiler, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (compiler and qemu):
        TIERS_SKIPPED["neon (qemu)"] = "no aarch64-linux-gnu-gcc or qemu-aarch64"
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    binary = tmp_path / "self_test"
    flags = [f for f in cpu_kernels.COMMON_FLAGS if f not in ("-shared", "-fPIC")] + list(cpu_kernels.BUILDS["neon"])
    subprocess.run(
        [compiler, *flags, "-static", "-DSELF_TEST", str(cpu_kernels.SOURCE), "-o", str(binary), "-lm"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    run = subprocess.run([qemu, str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("passed"), run.stdout + run.stderr
    assert "4 float lanes" in run.stdout and "MISMATCH" not in run.stdout
    TIERS_RUN.add("neon (qemu)")


def test_a_node_asked_for_no_tier_says_so_and_stops(tmp_path):
    """QWEN3_TTS_ISA names no tier: the node stops at once with exit code 2 and a one-line message
    that lists the tiers, no traceback."""
    import os
    import subprocess
    import sys

    config = tmp_path / "node.yaml"
    config.write_text("relay: {url: ws://127.0.0.1:9/v1/tunnel, token_env: T}\nmodels: {}\n")
    run = subprocess.run(
        [sys.executable, "-m", "local_node", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "QWEN3_TTS_ISA": "sse9", "T": "x" * 32},
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "QWEN3_TTS_ISA='sse9' is not a tier" in run.stderr and "avx2" in run.stderr
    assert "Traceback" not in run.stderr
