"""The engine's decode attention kernel against SDPA called per reply, side by side.

A decode step attends one new position per row over that row's own keys; SDPA gives a
row other values when the batch changes, so without ``attention.c`` the loop calls it
once per reply (``model_step.attend_by_run``). This times both at a step's shapes
(Blenderbot-400M's 32 heads of 40 over a chat prompt; SmolLM2's 9 heads of 64 sharing
3 key heads), in turns, and prints each one's time per call, the kernel's pace in
keys and values read against the machine's own memory pace (a tensor sum, same run),
and ``kernel / sdpa``; then the kernel over the same keys and values in bfloat16 (the
cache of ``int8``, ``precision.Precision.cache``) against float32. Cold: each row
reads its own keys, as a step does.

    python benchmarks/attention_kernel.py [--rows 32] [--length 53]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatbot.engine.cpu import cpu_isa  # noqa: E402
from chatbot.engine.kernels.attention import attend_rows, library  # noqa: E402

SHAPES = {"blenderbot-400m": (32, 32, 40), "smollm2-135m": (9, 3, 64)}
"""Query heads, key heads, head size."""


def best_ms(call: Callable[[], object], repeats: int = 20, rounds: int = 5) -> float:
    call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def read_gb_per_s() -> float:
    """How fast this machine reads a tensor much larger than its caches."""
    big = torch.ones(128 * 1024 * 1024)
    return big.numel() * 4 / best_ms(big.sum, repeats=2, rounds=3) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=53, help="positions each row reads")
    args = parser.parse_args()
    if library() is None:
        raise SystemExit("the C kernels did not build here (no C compiler?)")
    n, length = args.rows, args.length
    memory = read_gb_per_s()
    print(f"{cpu_isa()}, {torch.get_num_threads()} threads, memory read {memory:.1f} GB/s")
    for name, shape in SHAPES.items():
        print(compared(name, *shape, n, length, memory))


def compared(
    name: str, heads: int, kv_heads: int, dim: int, n: int, length: int, memory: float
) -> str:
    """The kernel and SDPA per reply at one shape, in words."""
    width = 128
    query = torch.randn(n, heads, 1, dim)
    keys, values = torch.randn(2, n, kv_heads, width, dim).unbind()
    rows, lengths = torch.arange(n), torch.full((n,), length)
    scale = dim**-0.5

    def kernel() -> torch.Tensor:
        return attend_rows(query, keys, values, rows, lengths, scale)

    def sdpa() -> list[torch.Tensor]:
        return [
            functional.scaled_dot_product_attention(
                query[r : r + 1], keys[r : r + 1, :, :length], values[r : r + 1, :, :length],
                scale=scale, enable_gqa=heads != kv_heads,
            )
            for r in range(n)
        ]  # fmt: skip

    halves = keys.bfloat16(), values.bfloat16()

    def kernel_bfloat16() -> torch.Tensor:
        return attend_rows(query, *halves, rows, lengths, scale)

    kernel_ms, sdpa_ms, halves_ms = best_ms(kernel), best_ms(sdpa), best_ms(kernel_bfloat16)
    read = 2 * n * kv_heads * length * dim * 4 / kernel_ms / 1e6
    return (
        f"{name}: kernel {kernel_ms:.3f} ms ({read:.1f} GB/s of keys and values, "
        f"{read / memory:.2f} of memory's), sdpa per reply {sdpa_ms:.3f} ms, "
        f"kernel / sdpa: {sdpa_ms / kernel_ms:.2f}; bfloat16 keys and values "
        f"{halves_ms:.3f} ms, float32 / bfloat16: {kernel_ms / halves_ms:.2f}"
    )


if __name__ == "__main__":
    main()
