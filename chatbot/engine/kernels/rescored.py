"""LM heads that read few bytes for the whole vocabulary and compute the best
candidates again in float32.

The head is the largest matrix a decoder-only step reads (SmolLM2's 49,152 x 576
float32 head is as large as its 30 layers together), so a cheaper kernel there pays
most. But a lower-precision head rounds the logits themselves: oneDNN's bfloat16
product returns bfloat16, whose steps near a logit of 25 are 0.125, so close
candidates tie and greedy decoding then picks by index, not by the model (SmolLM2's
"The" was 0.08 ahead of "L" and lost); an int8 head flips it too. So each row's
``RESCORED`` best logits of the cheap product are computed again in float32 from the
float32 weights (shared with a tied embedding, not copied), row by row: every token a
decoding can pick gets its float32 logit. Rows stay independent, as the cheap kernel's
are (``tests/kernel_probe.py``).

int8 reads a quarter of float32's bytes and, unlike 4-bit weights (ATen's int4 kernel
multiplies row by row), keeps its speed at 32 rows: the head of ``int4`` and ``int8``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from chatbot.engine.kernels.bfloat16 import BFloat16Linear
from chatbot.engine.kernels.int8 import Int8Linear
from chatbot.engine.kernels.rows import PackedLinear


class Rescored(PackedLinear):
    """Mixed in before a kernel: its product, then the best candidates in float32."""

    RESCORED = 32
    one_row: Callable[[torch.Tensor], torch.Tensor] | None = None
    """The kernel's product of a single row compiled (``compiled_step``), set once it
    gave the kernel's own values bit for bit: a conversation alone reads the whole
    vocabulary's weights every token."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.weight = linear.weight.detach()

    def cheap_product(self, rows: torch.Tensor) -> torch.Tensor:
        """The kernel's own product: the class after this mixin in the method order."""
        return super()._multiply(rows)  # type: ignore[safe-super]

    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        one_row = self.one_row
        out = (
            one_row(rows)
            if one_row is not None and rows.shape[0] == 1
            else self.cheap_product(rows)
        )
        best = out.topk(min(self.RESCORED, self.out_features), dim=1).indices
        exact = (self.weight[best] * rows[:, None, :]).sum(dim=-1)
        if self.bias is not None:
            exact += self.bias[best]
        return out.scatter_(1, best, exact)


class RescoredBFloat16Linear(Rescored, BFloat16Linear):
    kernel = "onednn bfloat16, best candidates rescored in float32"


class RescoredInt8Linear(Rescored, Int8Linear):
    kernel = "onednn int8, best candidates rescored in float32"
