"""Linear layers with weights pre-packed for oneDNN: the CPU decode fast path.

Decoding multiplies a few rows (one per conversation in the batch) by every weight
matrix at each step. PyTorch's default CPU route for that shape (MKL ``addmm``) is
slow on small row counts: on the 2-core benchmark machine a 1280x5120 layer took
10.3 ms for 8 rows, against 1.8 ms for 1, so batching barely paid. The same product
through oneDNN with the weight reordered once into its blocked layout takes 2.9 ms
for 8 rows and runs at 54 GFLOP/s for 32 (MKL: 27). This is what TorchInductor's
weight freezing does, without the compile step.

The packing is chosen for a typical decode batch (``BATCH_HINT`` rows). With it every
row's result is independent of how many rows share the call, so a batched reply
stays identical to the same reply computed alone.

``skip_padding`` goes one step further for the prompt: a batch is padded to its longest
conversation, and the encoder plus the decoder's cross-attention keys and values are
otherwise computed for every padding position too. In the benchmark's batch of 32
chit-chat conversations 58% of the 32 x 128 positions were padding. Inside the
context, layers skip those rows (their outputs are zeros, which the attention masks
ignore), so real rows get exactly the values they would get in a padded batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

BATCH_HINT = 32

# Token masks of the current batch, by the (batch, length) shape they apply to.
_padding_masks: ContextVar[dict[torch.Size, torch.Tensor]] = ContextVar(
    "padding_masks", default={}
)


@contextmanager
def skip_padding(attention_mask: torch.Tensor, copies: int = 1) -> Iterator[None]:
    """Let packed layers skip padded positions of ``attention_mask`` (batch, length).

    ``copies`` covers generate's expansion of each conversation into beams or
    samples (``repeat_interleave`` along the batch). Nothing is skipped when the
    batch has no padding.
    """
    real = attention_mask.bool()
    masks = {} if real.all() else {real.shape: real}
    if copies > 1 and masks:
        expanded = real.repeat_interleave(copies, dim=0)
        masks[expanded.shape] = expanded
    token = _padding_masks.set(masks)
    try:
        yield
    finally:
        _padding_masks.reset(token)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


class PackedLinear(nn.Module):
    """Inference-only replacement for ``nn.Linear`` holding a oneDNN-packed weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Plain attributes, not parameters: the opaque oneDNN tensor must not reach
        # state_dict, .to() or the optimiser machinery.
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = _padding_masks.get().get(x.shape[:-1])
        if real is None:
            return self._product(x)
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        out[real] = self._product(x[real])
        return out

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, self.bias, "none", [], ""
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def pack_linear_layers(model: nn.Module) -> int:
    """Swap every fp32 ``nn.Linear`` of a CPU model for a ``PackedLinear``.

    Returns how many layers were packed (0 when oneDNN is missing or the model is
    not an fp32 CPU model, which are left untouched).
    """
    if not onednn_available():
        return 0
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(module))
    return len(targets)
