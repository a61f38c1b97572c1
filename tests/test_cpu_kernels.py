"""cpu_kernels.c's bfloat16 product: bit for bit what oneDNN (F.linear, as qwen-tts calls it)
computes, on the real models' shapes, for one row and for several, on one core or shared among
several, and used by the prepared model.
Its int8 product is tested in test_int8.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from local_node import cpu_kernels
from local_node.packing import PackedLinear

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="cpu_kernels.c needs AVX-512 BF16 and VBMI and a C compiler")

# (out, in) of the 0.6B and 1.7B talkers' fused projections and heads, and tiny ones.
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (3072, 1024), (2048, 1024),
          (8192, 2048), (2048, 4096), (12288, 2048), (2048, 6144), (3072, 2048), (32, 64), (48, 96), (16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_linear_is_bit_identical_to_onednn(shape):
    torch.manual_seed(sum(shape))
    weight = (torch.randn(shape) * 0.05).to(torch.bfloat16)
    blocked = cpu_kernels.bf16_layout(weight)
    assert blocked is not None, "no block size reproduces oneDNN on this shape"
    for rows in (1, 1, 2, 4, 17, 33):  # one-row generation steps, batches, prefills
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        assert torch.equal(cpu_kernels.bf16_linear(x, blocked), F.linear(x, weight)), rows
    x = torch.randn(3, 5, shape[1], dtype=torch.bfloat16).transpose(0, 1)  # 3-D, not contiguous
    assert torch.equal(cpu_kernels.bf16_linear(x, blocked), F.linear(x, weight))


def test_a_wrong_block_size_shows():
    """The per-shape search can tell block sizes apart: summing in other blocks than oneDNN's
    changes some outputs (else the search above would prove nothing)."""
    torch.manual_seed(0)
    weight = (torch.randn(4096, 1024) * 0.05).to(torch.bfloat16)
    blocked = cpu_kernels.bf16_layout(weight)
    x = torch.randn(8, 1024, dtype=torch.bfloat16)
    assert not torch.equal(cpu_kernels.bf16_linear(x, blocked, (1024, 1024)), cpu_kernels.bf16_linear(x, blocked, (256, 256)))


def test_packed_linear_uses_it_where_it_can():
    plain = torch.nn.Linear(1024, 4096, bias=False).to(torch.bfloat16)
    with_bias = torch.nn.Linear(1024, 4096, bias=True).to(torch.bfloat16)
    odd = torch.nn.Linear(1024, 100, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 1024, dtype=torch.bfloat16)
    for linear, ours in ((plain, True), (with_bias, False), (odd, False)):
        packed = PackedLinear(linear)
        assert packed.ours is ours
        assert torch.equal(packed(x), linear(x))


def test_products_shared_among_cores_equal_one_core_alone():
    """Rows split among helper threads (3 shares: uneven splits too), from several threads at
    once while a decoder reserves and frees cores: every product equals the one-thread product."""
    import threading

    assert cpu_kernels.use_cores(3) == 3
    torch.manual_seed(7)
    cases = []
    for n, k in ((4096, 1024), (1024, 3072), (96, 64), (32, 64)):
        weight = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        cases.append((cpu_kernels.bf16_layout(weight), cpu_kernels.int8_layout(codes), torch.rand(n), k))
    xs = {k: [torch.randn(rows, k, dtype=torch.bfloat16) for rows in (1, 2, 5)] for *_, k in cases}

    def products() -> list[torch.Tensor]:
        return [product for blocked, quantized, scale, k in cases for x in xs[k]
                for product in (cpu_kernels.bf16_linear(x, blocked), cpu_kernels.int8_linear(x, quantized, scale))]

    with cpu_kernels.reserved(3):
        alone = products()
    assert all(torch.equal(a, b) for a, b in zip(products(), alone))

    failures, stop = [], threading.Event()

    def compute() -> None:
        for _ in range(30):
            if not all(torch.equal(a, b) for a, b in zip(products(), alone)):
                failures.append(threading.current_thread().name)

    def decode() -> None:
        while not stop.is_set():
            with cpu_kernels.reserved(1):
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


@pytest.mark.parametrize("dim", [8, 64, 128, 200, 1000, 1024, 2048, 3072, 4096])
def test_row_sums_take_torchs_order_and_another_order_shows(dim):
    """rms_norm's sums equal torch.sum's bit for bit; the same rows summed left to right do not
    (so decoder_stack's load-time check on these sums can tell orders apart)."""
    torch.manual_seed(dim)
    squares = ((torch.randn(64, dim) * torch.rand(64, 1) * 30).to(torch.bfloat16).float()) ** 2
    assert torch.equal(cpu_kernels.row_sums(squares), squares.sum(-1))
    in_order = torch.zeros(64)
    for column in squares.T:
        in_order = in_order + column
    assert dim < 64 or not torch.equal(in_order, squares.sum(-1))


def test_rms_norm_refuses_what_it_cannot_read():
    weight = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        cpu_kernels.rms_norm(torch.ones(2, 16), weight, 1e-6)  # float32
    with pytest.raises(ValueError):
        cpu_kernels.rms_norm(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(16, 2, dtype=torch.bfloat16).T[0], 1e-6)


@pytest.mark.parametrize("heads, kv_heads, dim", [(16, 8, 128), (2, 1, 32), (4, 4, 64)])
def test_attend_one_is_float32_sdpa_with_the_cache_written(heads, kv_heads, dim):
    """int8 models' attention for one new position: each sequence's new key and value land in its
    cache row at its position, and each query head attends as float32 SDPA (grouped-query) does,
    up to float32 rounding; lengths that are and are not multiples of 16."""
    torch.manual_seed(heads * dim)
    keys, values = torch.randn(4, kv_heads, 320, dim), torch.randn(4, kv_heads, 320, dim)
    want_keys, want_values = keys.clone(), values.clone()
    rows, starts = [2, 0, 3, 1], [0, 15, 16, 300]
    qkv = (torch.randn(4, 1, heads + 2 * kv_heads, dim) * 2).to(torch.bfloat16)
    qk, v = qkv[:, :, : heads + kv_heads].contiguous(), qkv[:, :, heads + kv_heads :]
    got = cpu_kernels.attend_one(qk, v, keys, values, rows, starts, dim**-0.5)
    assert got.shape == (4, 1, heads * dim) and got.dtype == torch.bfloat16
    for j, (row, start) in enumerate(zip(rows, starts)):
        want_keys[row, :, start], want_values[row, :, start] = qk[j, 0, heads:].float(), v[j, 0].float()
        q = qk[j : j + 1, :, :heads].transpose(1, 2).float()
        want = F.scaled_dot_product_attention(q, want_keys[row : row + 1, :, : start + 1],
                                              want_values[row : row + 1, :, : start + 1], scale=dim**-0.5, enable_gqa=True)
        torch.testing.assert_close(got[j, 0].float(), want.transpose(1, 2).reshape(-1).bfloat16().float(), rtol=8e-3, atol=1e-3)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


def test_attend_one_refuses_what_it_cannot_read():
    keys = values = torch.zeros(1, 1, 8, 32)
    qkv = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
    qk, v = qkv[:, :, :3].contiguous(), qkv[:, :, 3:]
    cpu_kernels.attend_one(qk, v, keys, values, [0], [7], 1.0)  # the last position: fine
    for bad in ([0], [8]), ([1], [0]), ([-1], [0]):  # position past the cache, rows outside it
        with pytest.raises(ValueError):
            cpu_kernels.attend_one(qk, v, keys, values, *bad, 1.0)
    with pytest.raises(ValueError):
        cpu_kernels.attend_one(qk.float(), v, keys, values, [0], [0], 1.0)
    with pytest.raises(ValueError):
        cpu_kernels.attend_one(qk, v, keys.half(), values.half(), [0], [0], 1.0)
    long = torch.zeros(1, 1, cpu_kernels.MAX_EXACT_POSITIONS + 1, 32, dtype=torch.bfloat16)
    cpu_kernels.attend_one(qk, v, long, long.clone(), [0], [cpu_kernels.MAX_EXACT_POSITIONS - 1], 1.0)
    with pytest.raises(ValueError):  # past SDPA's first block of keys: SDPA's to do
        cpu_kernels.attend_one(qk, v, long, long.clone(), [0], [cpu_kernels.MAX_EXACT_POSITIONS], 1.0)
    kv2 = torch.zeros(1, 2, 8, 32)
    with pytest.raises(ValueError):  # 1 query head cannot share 2 kv heads
        cpu_kernels.attend_one(qk, qkv[:, :, 2:], kv2, kv2, [0], [0], 1.0)


@pytest.mark.parametrize("heads, kv_heads, dim", [(16, 8, 128), (2, 1, 32)])
@pytest.mark.parametrize("values", ["ordinary", "wide"])
def test_attend_one_in_bf16_is_sdpa_bit_for_bit(heads, kv_heads, dim, values):
    """On bfloat16 caches, three sequences at different lengths attended step by step up to SDPA's
    first block of keys (512) get exactly what bfloat16 SDPA gives each (grouped-query heads):
    on ordinary values, and on values of wide exponents and signs, whose sums show their order."""
    generator = torch.Generator().manual_seed(heads + dim)
    steps, starts0, scale = cpu_kernels.MAX_EXACT_POSITIONS, [0, 100, 300], dim**-0.5
    if values == "wide":
        exponents = torch.randint(0, 8, (steps, 3, heads + 2 * kv_heads, dim), generator=generator).float()
        signs = torch.randint(0, 2, exponents.shape, generator=generator) * 2 - 1
        qkv = ((torch.rand(exponents.shape, generator=generator) + 1) * 2**exponents * signs).to(torch.bfloat16)
        scale = 1e-4
    else:
        qkv = (torch.randn(steps, 3, heads + 2 * kv_heads, dim, generator=generator) * 2).to(torch.bfloat16)
    keys, values_ = (torch.randn(3, kv_heads, steps, dim, generator=generator).to(torch.bfloat16) for _ in range(2))
    for t in range(0, steps - max(starts0)):
        starts = [s + t for s in starts0]
        step = qkv[t][:, None]  # [3 rows, 1, heads + 2 kv, dim]
        got = cpu_kernels.attend_one(step[:, :, : heads + kv_heads].contiguous(), step[:, :, heads + kv_heads :], keys, values_,
                                     [2, 0, 1], starts, scale)
        for j, (row, start) in enumerate(zip([2, 0, 1], starts)):
            assert torch.equal(keys[row, :, start], step[j, 0, heads : heads + kv_heads])
            want = F.scaled_dot_product_attention(step[j : j + 1, :, :heads].transpose(1, 2), keys[row : row + 1, :, : start + 1],
                                                  values_[row : row + 1, :, : start + 1], scale=scale, enable_gqa=True)
            assert torch.equal(got[j], want.transpose(1, 2).reshape(1, -1)), (t, j)
