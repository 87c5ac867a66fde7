"""One product for the projections that read the same input.

A Llama layer multiplies its normed input by three matrices for attention (queries,
keys, values) and by two for its MLP (gate, up); Blenderbot's self-attention by three
too, and its cross-attention the encoded prompt by two. At one conversation each such
product reads a few hundred kilobytes of weights, and its fixed cost (the call, the
kernel's threads starting and meeting) is as large as the reading: SmolLM2's 210 int4
products a token become 120 when the matrices of a group are stacked into one.

Stacking keeps results exact: each output column of a product is computed from its own
weights alone, whichever columns share the matrix (``tests/kernel_probe.py`` checks
this for every kernel, under every instruction set). So the model's own code, which
calls ``q_proj``, ``k_proj`` and ``v_proj`` one after another on the same tensor, is
left as it is: the first call computes the stacked product and the others take their
columns of it (``ProjectionPart``).
"""

from __future__ import annotations

import threading
from typing import cast

import torch
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections that read the same input, in Llama's and Blenderbot's naming."""
CROSS_ATTENTION = "encoder_attn"
CROSS_ATTENTION_GROUPS = (("k_proj", "v_proj"),)
"""Blenderbot's cross-attention (``CROSS_ATTENTION``): only its keys and values read the
same input (the encoded prompt); its queries read the decoder's state."""


class SharedProduct(nn.Module):
    """The stacked product of a group of projections, computed once per input and
    handed out part by part. Its ``product`` is an ``nn.Linear`` until a kernel
    replaces it (``replace_linear_layers``), like any other layer."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        self.product = nn.Linear(
            linears[0].in_features, sum(self.sizes), bias=linears[0].bias is not None
        )
        with torch.no_grad():
            self.product.weight.copy_(torch.cat([linear.weight for linear in linears]))
            if self.product.bias is not None:
                self.product.bias.copy_(torch.cat([linear.bias for linear in linears]))
        # Per thread: adaptive batching's ``generate`` and the decode loop run in
        # threads of their own.
        self._last = threading.local()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Projection ``index`` of ``x``. The parts of one input are kept until each is
        taken once, then dropped: a long prompt's would otherwise stay in memory."""
        last = self._last
        if getattr(last, "input", None) is not x or index in last.taken:
            last.input, last.taken = x, set()
            last.parts = self.product(x).split(self.sizes, dim=-1)
        last.taken.add(index)
        part = last.parts[index]
        if len(last.taken) == len(self.sizes):
            last.input = last.parts = None
        return part


class ProjectionPart(nn.Module):
    """Stands in for one projection of a ``SharedProduct`` group."""

    def __init__(self, shared: SharedProduct, index: int) -> None:
        super().__init__()
        self.shared, self.index = shared, index
        self.in_features, self.out_features = shared.product.in_features, shared.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of the shared product"


def fuse_projections(model: nn.Module) -> int:
    """Stack every group of float32 ``nn.Linear`` projections of ``model`` that read
    the same input (``GROUPS``) into one ``SharedProduct``. Returns how many groups."""
    fused = 0
    for name, module in list(model.named_modules()):
        groups = CROSS_ATTENTION_GROUPS if name.endswith(CROSS_ATTENTION) else GROUPS
        for names in groups:
            linears = [getattr(module, child, None) for child in names]
            if _stackable(linears):
                shared = SharedProduct(cast(list[nn.Linear], linears))
                for index, child in enumerate(names):
                    setattr(module, child, ProjectionPart(shared, index))
                fused += 1
    return fused


def _stackable(modules: list[nn.Module | None]) -> bool:
    """Float32 linear layers on one device, of one input size, all with or all
    without a bias."""
    if not all(type(module) is nn.Linear for module in modules):
        return False
    linears = cast(list[nn.Linear], modules)
    return len({(lin.in_features, lin.bias is None, lin.weight.dtype, lin.weight.device)
                for lin in linears}) == 1 and linears[0].weight.dtype == torch.float32  # fmt: skip
