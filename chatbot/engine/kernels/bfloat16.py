"""bfloat16 weights pre-packed for oneDNN, for CPUs with AVX512_BF16 or AMX.

Half the weight bytes of float32, and on those CPUs twice the multiply rate (AMX: far
more). Only the linear layers run in bfloat16: inputs are rounded to it, outputs come
back as float32, so layer norms, attention and the key/value cache keep float32's
precision. oneDNN's bfloat16 kernels were measured to give a row the same result
whatever rows share the call, one row included (``tests/test_kernels.py``), with
AVX512_BF16; with AMX only once capped below it (``cpu.run_without_amx``).
"""

from __future__ import annotations

import torch
from torch import nn

from chatbot.engine.cpu import WITHOUT_AMX, at_least
from chatbot.engine.kernels.rows import BATCH_HINT, PackedLinear


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
