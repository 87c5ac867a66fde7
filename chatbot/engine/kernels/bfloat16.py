"""bfloat16 weights pre-packed for oneDNN, for CPUs with AVX512_BF16 or AMX.

Half the weight bytes of float32, and on those CPUs twice the multiply rate (AMX: far
more). Only the linear layers run in bfloat16: inputs are rounded to it, outputs come
back as float32, so layer norms, attention and the key/value cache keep float32's
precision. oneDNN's bfloat16 kernels were measured to give a row the same result
whatever rows share the call, one row included (``tests/test_kernels.py``), with
AVX512_BF16; with AMX only once capped below it (``run_without_amx``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from chatbot.engine.kernels.cpu import at_least, cpu_isa
from chatbot.engine.kernels.rows import BATCH_HINT, PackedLinear

WITHOUT_AMX = "avx512_core_bf16"


def run_without_amx() -> None:
    """Cap this process's oneDNN below AMX, where bfloat16 products depend on the rows
    beside them.

    On a Xeon with AMX, oneDNN multiplies up to 32 rows with AVX512_BF16 and more with
    AMX tiles, which sum in another order; for 5120 inputs the result of a row kept
    changing up to 233 rows. A reply would then differ with what shares its batch.
    Capped at AVX512_BF16 every row count agrees (as on CPUs without AMX), at the
    cost of AMX's speed on large batches (128 rows: 2.2 ms instead of 14 for a
    1280x5120 layer). oneDNN reads the cap once, at its first kernel: the service calls
    this (through ``precision.prepare_process``) before it loads the model. int8 keeps AMX:
    its integer sums are exact, whatever the kernel.
    """
    if cpu_isa() == "avx512_core_amx":
        os.environ["ONEDNN_MAX_CPU_ISA"] = WITHOUT_AMX.upper()
        cpu_isa.cache_clear()


class BFloat16Linear(PackedLinear):
    kernel = "onednn bfloat16"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        if not at_least(WITHOUT_AMX):  # emulated: one row alone sums in another order
            self.smallest_call = 2
        weight = linear.weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)

    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(
            rows.to(torch.bfloat16), self.packed, None, "none", [], ""
        )
        out = out.float()
        return out if self.bias is None else out.add_(self.bias)
