"""The products alone, every kernel tier this CPU runs, against the machine's read bandwidth.

    ./bench.sh kernels                 # options: --megabytes N, --repeats N

One row of x against 40 weights of [6144 x 1024] (the 0.6B talker's gate/up projection; about
500 MB in bfloat16, far past any cache), on one core and on all physical cores, for:

  ours        each tier's ``bf16_linear`` and ``int8_linear`` (local_node/kernels/cpu_kernels.c)
  PyTorch     what the node falls back to without our kernels: oneDNN's packed bfloat16 product
              (``portable``), ``_weight_int8pack_mm`` for int8 weights; and MKL's float32
              matrix-vector product, the vendor's best at streaming weights, as a reference

GB/s of weights read and the share of the streaming read bandwidth measured in the same run
(``Kernels.read_seconds``). Writes ``bench/results/kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

from local_node.kernels import tiers

tiers.cap_vendor_libraries()

import torch  # noqa: E402

from local_node.__main__ import physical_cores  # noqa: E402
from local_node.kernels import cpu_kernels  # noqa: E402
from local_node.model.packing import _onednn_packed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (6144, 1024)


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def rate(nbytes: int, product: Callable[[torch.Tensor], object], operands: list, repeats: int) -> float:
    """GB/s of weights read: ``nbytes`` over the best time of ``product`` on every operand."""
    return nbytes / best_seconds(lambda: [product(operand) for operand in operands], repeats) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./bench.sh kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=500, help="bfloat16 weight bytes per pass")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    count = max(1, args.megabytes * 10**6 // (SHAPE[0] * SHAPE[1] * 2))
    torch.manual_seed(0)
    weights = [(torch.randn(SHAPE) * 0.05).to(torch.bfloat16) for _ in range(count)]
    codes = [torch.randint(-127, 128, SHAPE, dtype=torch.int8) for _ in range(count)]
    scale = torch.rand(SHAPE[0])
    x = torch.randn(1, SHAPE[1], dtype=torch.bfloat16)
    bf16_bytes, int8_bytes = sum(w.nbytes for w in weights), sum(c.nbytes for c in codes)
    cores = sorted({1, physical_cores()})
    runs = [k for k in map(cpu_kernels.kernels, cpu_kernels.machine_tiers()) if k]
    runs = [k for k in runs if k.tier != "amx"]  # amx runs avx512_bf16's products
    bandwidth = runs[0].read_bandwidth(cores, args.repeats) if runs else {}

    results: dict = {"shape": SHAPE, "weights": count, "cores": {}}
    print(
        f"{count} weights of {SHAPE[0]} x {SHAPE[1]}: {bf16_bytes / 1e6:.0f} MB bf16, {int8_bytes / 1e6:.0f} MB int8; "
        f"one row; kernels: {', '.join(k.tier for k in runs) or 'none'}"
    )
    for n in cores:
        row: dict[str, float] = {}
        torch.set_num_threads(n)
        if n in bandwidth:
            row["read bandwidth"] = bandwidth[n]
        for kernels in runs:
            kernels.use_cores(max(cores))
            with kernels.reserved(max(cores) - n):
                row[f"ours {kernels.tier} bf16"] = rate(
                    bf16_bytes, lambda w: kernels.bf16_linear(x, w), [kernels.bf16_layout(w) for w in weights], args.repeats
                )
                row[f"ours {kernels.tier} int8"] = rate(
                    int8_bytes, lambda c: kernels.int8_linear(x, c, scale), [kernels.int8_layout(c) for c in codes], args.repeats
                )
        packed = [_onednn_packed(w) for w in weights]
        if all(p is not None for p in packed):
            row["oneDNN packed bf16"] = rate(
                bf16_bytes, lambda p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), packed, args.repeats
            )
        del packed
        row["PyTorch _weight_int8pack_mm"] = rate(
            int8_bytes, lambda c: torch._weight_int8pack_mm(x, c, scale.bfloat16()), codes, args.repeats
        )
        floats = [w.float() for w in weights[: max(1, count // 2)]]
        row["MKL float32 (reference)"] = rate(sum(f.nbytes for f in floats), lambda f: torch.mv(f, x.float()[0]), floats, args.repeats)
        del floats
        results["cores"][n] = row
    print_table(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernels.json").write_text(json.dumps({"tier": cpu_kernels.active_tier(), **results}, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'kernels.json'}")


def print_table(results: dict) -> None:
    cores = list(results["cores"])
    names = list(dict.fromkeys(name for row in results["cores"].values() for name in row))
    print("\n| product, one row | " + " | ".join(f"{n} core{'s' * (n > 1)}: GB/s (of bandwidth)" for n in cores) + " |")
    print("|---|" + "---:|" * len(cores))
    for name in names:
        cells = []
        for n in cores:
            row = results["cores"][n]
            bandwidth = row.get("read bandwidth")
            value = row.get(name)
            cells.append(
                "-"
                if value is None
                else f"{value:.1f}" + (f" ({100 * value / bandwidth:.0f} %)" if bandwidth and name != "read bandwidth" else "")
            )
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
