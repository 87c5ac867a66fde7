"""Run by tests/test_kernels.py in a fresh process, under one ``ONEDNN_MAX_CPU_ISA``
(oneDNN reads it once, at its first kernel; ATen's own kernels, int4's, are capped by
``ATEN_CPU_CAPABILITY``): for every kernel this instruction set can
run, the row counts whose rows come out different from the same rows in a 64-row call
(or whose columns differ from the same columns of a smaller matrix), and the largest
error of int8 against exact integer arithmetic. Prints one JSON object.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
from torch import nn

from chatbot.engine.cpu import cpu_isa, run_without_amx
from chatbot.engine.kernels import (
    BFloat16Linear,
    Float32Linear,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    Rescored,
    RescoredBFloat16Linear,
    RescoredInt8Linear,
)
from chatbot.engine.kernels.attention import CACHED, attend_rows
from chatbot.engine.kernels.int8 import absmax_scales, weight_range
from chatbot.engine.kernels.native import isa_flags


def rows_that_differ(layer: PackedLinear, batch: torch.Tensor) -> list[str]:
    """Counts (and orders) in which a row's result differs from its 64-row result."""
    together = layer(batch)
    differ = [str(n) for n in range(1, 65) if not torch.equal(layer(batch[:n]), together[:n])]
    if not torch.equal(layer(batch.flip(0)), together.flip(0)):
        differ.append("reversed")
    return differ


def columns_that_differ(whole: PackedLinear, linear: nn.Linear, batch: torch.Tensor):
    """Row counts at which ``whole`` (``linear`` in some kernel) gives its first 256
    outputs otherwise than the same kernel on those outputs' weights alone: stacked
    projections (``kernels.fused``) rely on a column depending on its own weights only."""
    if isinstance(whole, Rescored):  # a head: the columns it rescores depend on the rest
        return []
    part = nn.Linear(linear.in_features, 256)
    part.weight.copy_(linear.weight[:256])
    part.bias.copy_(linear.bias[:256])
    alone = type(whole)(part)
    counts = (1, 2, 7, 64)
    return [
        f"stacked {n}"
        for n in counts
        if not torch.equal(whole(batch[:n])[:, :256], alone(batch[:n]))
    ]


def int8_error(linear: nn.Linear, x: torch.Tensor) -> float:
    """Largest relative error of ``Int8Linear`` against the same quantization's exact
    integer sums, scaled in float32 as the kernel scales them: 0 where the kernel sums
    exactly (a saturating kernel would be far off), so that any exact kernel gives the
    same floats (``compiled_step`` lets inductor pick its own for int8)."""
    w_scales = absmax_scales(linear.weight, weight_range()).squeeze(1)
    w = (linear.weight / w_scales[:, None]).round().long()
    x_scales = absmax_scales(x)
    q = (x / x_scales).round().long()
    exact = (q @ w.T).float().mul_(w_scales).mul_(x_scales).add_(linear.bias)
    got = Int8Linear(linear)(x)
    return float((got - exact).abs().max() / exact.abs().max())


def attention_cases_that_differ() -> list[str]:
    """Where a row's attention (``kernels.attention``) differs from the same row in a
    64-row call: fewer rows, the reverse order, a narrower key buffer; with Blenderbot's
    40-wide heads and SmolLM2's 64-wide grouped ones, some rows reading a shared row;
    over float32 keys and values, and bfloat16 ones (int8's cache)."""
    differ = []
    shapes = ((32, 32, 40), (9, 3, 64))
    for (heads, kv_heads, dim), cached in itertools.product(shapes, CACHED):
        keys, values = torch.randn(2, 64, kv_heads, 80, dim).to(cached).unbind()
        query = torch.randn(64, 1, heads, dim).transpose(1, 2)  # as a step's projection
        lengths = torch.randint(1, 81, (64,))
        rows = torch.where(torch.rand(64) < 0.3, 0, torch.arange(64))
        together = attend_rows(query, keys, values, rows, lengths, dim**-0.5)
        for n in (1, 2, 7, 64):
            width = int(lengths[:n].max())
            narrow = keys[:, :, :width], values[:, :, :width]
            alone = attend_rows(query[:n], *narrow, rows[:n], lengths[:n], dim**-0.5)
            if not torch.equal(alone, together[:n]):
                differ.append(f"{dim}-wide heads, {cached}, {n} rows")
        flipped = [t.flip(0) for t in (query, rows, lengths)]
        reverse = attend_rows(flipped[0], keys, values, *flipped[1:], dim**-0.5)
        if not torch.equal(reverse, together.flip(0)):
            differ.append(f"{dim}-wide heads, {cached}, reversed")
    return differ


def main() -> None:
    """``--bfloat16``: the bfloat16 kernels alone, as the service runs them (capped below
    AMX first, ``run_without_amx``); otherwise every other kernel, at the level given."""
    torch.manual_seed(0)
    linear = nn.Linear(5120, 1280)  # 5120 inputs: where AMX's bfloat16 sums vary most
    batch = torch.randn(64, 5120)
    kernels: list[type[PackedLinear]] = [Float32Linear, Int8Linear, RescoredInt8Linear, Int4Linear]
    if "--bfloat16" in sys.argv:
        run_without_amx()
        kernels = [BFloat16Linear, RescoredBFloat16Linear]
    with torch.inference_mode():
        layers = [kernel(linear) for kernel in kernels]
        differ = {
            type(layer).__name__: rows_that_differ(layer, batch)
            + columns_that_differ(layer, linear, batch)
            for layer in layers
        }
        # Every weight and input at its extreme: the worst case for 16-bit pair sums.
        extreme = nn.Linear(256, 64)
        extreme.weight.copy_(torch.where(torch.rand(64, 256) < 0.5, -1.0, 1.0))
        worst = torch.full((4, 256), 3.0) * torch.where(torch.rand(4, 256) < 0.9, 1.0, -1.0)
        errors = {"random": int8_error(linear, batch), "extreme": int8_error(extreme, worst)}
        if "--bfloat16" not in sys.argv:
            differ["attention"] = attention_cases_that_differ()
    aten = torch.backends.cpu.get_cpu_capability()
    found = {"isa": cpu_isa(), "aten": aten, "differ": differ, "int8_error": errors}
    print(json.dumps({**found, "attention_flags": isa_flags()}))


if __name__ == "__main__":
    main()
