"""4-bit weights in groups of 32, bfloat16 activations: the fewest bytes a decode step reads.

At one conversation a decode step is bound by how many weight bytes it reads: a
float32 SmolLM2-135M reads 540 MB a token, and a 4-bit one a seventh of that. Each
group of 32 consecutive input weights of an output channel keeps its own minimum and
step (asymmetric, 16 levels), the layout of llama.cpp's ``Q4_1``: re-quantizing the
float32 weights the service dequantizes from the offline model's ``Q4_1`` GGUF gives
back the stored 4-bit codes wherever a group used both its end codes (most do), so the
GGUF's 4-bit weights are served as 4-bit weights again.

ATen's weight-only int4 CPU kernel (``_weight_int4pack_mm_for_cpu``, the one torchao
uses) unpacks a block of weights to float and multiplies it by the rows, each row
alone, so a row's result does not depend on the rows beside it
(``tests/test_kernels.py``). Its vectorized path takes bfloat16 rows (float16 and
float32 rows take a scalar path 20x slower here), so inputs are rounded to bfloat16 as
``BFloat16Linear`` rounds them, and its bfloat16 outputs are widened to float32 again.
"""

from __future__ import annotations

import torch
from torch import nn

from chatbot.engine.kernels.rows import PackedLinear

GROUP = 32
"""Input weights that share one minimum and step: llama.cpp's Q4_0 and Q4_1 blocks."""
_LEVELS = 15
_OUTPUTS_PACKED = 16  # the packed layout's block of output channels


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (out, in) int32 codes 0..15, and (in / 32, out, 2) bfloat16
    (step, middle) per group, in ATen's layout: a weight is ``(code - 8) * step + middle``."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    step = ((high - low) / _LEVELS).clamp_(min=torch.finfo(torch.float32).tiny)
    codes = groups.sub(low).div_(step).round_().clamp_(0, _LEVELS).to(torch.int32)
    middle = low + 8 * step
    scales_and_zeros = torch.cat([step, middle], dim=-1).transpose(0, 1).contiguous()
    return codes.reshape(out_features, in_features), scales_and_zeros.to(torch.bfloat16)


def dequantize_groups(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The float32 weights the kernel multiplies by (for tests and quality checks)."""
    out_features, in_features = codes.shape
    step, middle = scales_and_zeros.float().transpose(0, 1).unbind(-1)
    groups = codes.reshape(out_features, in_features // GROUP, GROUP).float() - 8
    return (groups * step[..., None] + middle[..., None]).reshape(out_features, in_features)


class Int4Linear(PackedLinear):
    kernel = "aten int4 weight-only, groups of 32"

    @classmethod
    def takes(cls, linear: nn.Linear) -> bool:
        return linear.in_features % GROUP == 0 and linear.out_features % _OUTPUTS_PACKED == 0

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        codes, self.scales_and_zeros = quantize_groups(linear.weight.detach())
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)

    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int4pack_mm_for_cpu(  # the C++ binding: no dispatch in Python
            rows.to(torch.bfloat16), self.packed, GROUP, self.scales_and_zeros
        ).float()
        return out if self.bias is None else out.add_(self.bias)
