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

Row by row is what a decode step wants (a few rows, each reading every weight once)
and what a prompt does not: 300 prompt positions of SmolLM2 took 598 ms through it on
a 2-core Xeon (``benchmarks/prompt_time.py``), and a conversation waits for its whole
prompt before its first token. So where the CPU multiplies bfloat16 natively
(AVX512_BF16, AMX), a call with more than one position per sequence, (batch,
positions > 1, features), which only a prompt makes (a decoder-only prompt, the
encoder, Blenderbot's cross-attention keys and values), goes to a ``BFloat16Linear``
of the same 4-bit weights: the same bfloat16 inputs times the same weights, summed by
oneDNN's matrix kernels (AMX where the CPU has it) instead of row by row. Decode steps
(one position per sequence) always take the 4-bit kernel. A reply is computed alike
alone or beside others in the decode loop: the kernel a prompt's rows get depends only
on its own length (a one-token prompt passes alone, ``model_step.packed_prompts``), and
below AMX the bfloat16 kernel's rows are independent, so prompts may share a pass.
Under AMX a prompt's sums can differ with the rows beside it, so there the loop runs
each prompt in a pass of its own (``prompt_rows_alone``); adaptive batching pads
prompts into one call, where they can differ with the batch, as that mode's attention
already makes replies differ in every precision but float32. An int8 prompt kernel was
as fast but cost 2.4% perplexity: its
per-row activation scales are what cost the ``int8`` precision its quality.
``four_bits_throughout`` sends every call to the 4-bit kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from chatbot.engine.cpu import at_least
from chatbot.engine.kernels.bfloat16 import BFloat16Linear
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


_prompt_kernel_on: ContextVar[bool] = ContextVar("prompt_kernel_on", default=True)


@contextmanager
def four_bits_throughout() -> Iterator[None]:
    """Every ``Int4Linear`` call through the 4-bit kernel, prompts too."""
    token = _prompt_kernel_on.set(False)
    try:
        yield
    finally:
        _prompt_kernel_on.reset(token)


class Int4Linear(PackedLinear):
    kernel = "aten int4 weight-only, groups of 32"
    prompts_in_bfloat16 = True
    """Whether prompts go to a bfloat16 kernel where the CPU has one (see above)."""

    @classmethod
    def takes(cls, linear: nn.Linear) -> bool:
        return linear.in_features % GROUP == 0 and linear.out_features % _OUTPUTS_PACKED == 0

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        codes, self.scales_and_zeros = quantize_groups(linear.weight.detach())
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        native = self.prompts_in_bfloat16 and at_least("avx512_core_bf16")
        self.prompts = self._prompt_kernel(codes) if native else None
        self.prompt_rows_alone = self.prompts is None or not at_least("avx512_core_amx")

    def _prompt_kernel(self, codes: torch.Tensor) -> BFloat16Linear:
        four_bit = nn.utils.skip_init(
            nn.Linear, self.in_features, self.out_features, bias=self.bias is not None
        )
        with torch.no_grad():
            four_bit.weight.copy_(dequantize_groups(codes, self.scales_and_zeros))
            if self.bias is not None:
                four_bit.bias.copy_(self.bias)
        return BFloat16Linear(four_bit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompt = x.dim() == 3 and x.shape[1] > 1
        if prompt and self.prompts is not None and _prompt_kernel_on.get():
            return self.prompts(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        prompts = "; prompts: onednn bfloat16 of the same weights" if self.prompts else ""
        return super().extra_repr() + prompts

    def add_rows(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The kernel's bfloat16 products added to float32 ``residual`` as they are:
        the sum promotes each to float32 exactly, as widening them first would, in one
        operation fewer (two a layer, 60 a SmolLM2 token). Rows are multiplied each
        alone, so they need no bucket."""
        if self.bias is not None:
            return super().add_rows(residual, x)
        return residual + self._bfloat16_product(x)

    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        out = self._bfloat16_product(rows).float()
        return out if self.bias is None else out.add_(self.bias)

    def _bfloat16_product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(  # the C++ binding: no dispatch in Python
            rows.to(torch.bfloat16), self.packed, GROUP, self.scales_and_zeros
        )
