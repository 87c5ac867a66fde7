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

``skip_redundant_rows`` goes one step further for the prompt. A batch is padded to
its longest conversation, and the encoder plus the decoder's cross-attention keys and
values are otherwise computed for every padding position too: in the benchmark's
batch of 32 chit-chat conversations 58% of the 32 x 128 positions were padding.
Inside the context, layers skip those rows (their outputs are zeros, which the
attention masks ignore), so real rows get exactly the values they would get in a
padded batch. Beam search also repeats the encoder output once per beam before the
cross-attention projects it, so with Blenderbot's 10 beams nine of every ten rows of
those projections repeat the first: they are computed once per conversation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

BATCH_HINT = 32


@dataclass(frozen=True)
class _Rows:
    """Which rows of a (batch, length, features) input a packed layer computes."""

    real: torch.Tensor | None
    """(batch / copies, length) positions that are not padding; None: every one."""
    copies: int
    """Each group of this many consecutive batch rows holds one row's values."""


# The current batch's rows, by the (batch, length) shape they apply to.
_batch_rows: ContextVar[Mapping[torch.Size, _Rows]] = ContextVar(
    "batch_rows", default=MappingProxyType({})
)


@contextmanager
def skip_redundant_rows(attention_mask: torch.Tensor, copies: int = 1) -> Iterator[None]:
    """Let packed layers skip padded positions of ``attention_mask`` (batch, length),
    and compute generate's ``copies`` of each conversation (its beams, made with
    ``repeat_interleave`` along the batch) once.

    A one-token prompt is left alone: its (batch, 1) shape is also the shape of every
    decoder step, whose rows differ.
    """
    real = attention_mask.bool()
    batch, length = real.shape
    padded = None if real.all() else real
    rows: dict[torch.Size, _Rows] = {}
    if padded is not None:
        rows[real.shape] = _Rows(padded, 1)
    if copies > 1 and length > 1:
        rows[torch.Size((batch * copies, length))] = _Rows(padded, copies)
    token = _batch_rows.set(rows)
    try:
        yield
    finally:
        _batch_rows.reset(token)


def row_bucket(count: int) -> int:
    """``count`` rounded up to 4 steps per doubling past 8 (at most 25% more rows).
    Rows stay independent, so padding never changes a real row's result."""
    if count <= 8:
        return count
    step = 1 << (count.bit_length() - 3)  # a quarter of the power of two below count
    return -(-count // step) * step


# oneDNN builds a kernel for each row count it is given, about 0.5 MiB of code apiece,
# and keeps it. A product never hands it more than this many rows (a long prompt goes
# in slices), so the row counts it sees are the buckets up to here: 28 of them, built
# once at load (``warm_up``) rather than one by one over hours of traffic.
MAX_ROWS_PER_CALL = 256
ROW_COUNTS = sorted({row_bucket(count) for count in range(1, MAX_ROWS_PER_CALL + 1)})


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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
        rows = _batch_rows.get().get(x.shape[:-1])
        if rows is None:
            return self._product(x)
        x = x[:: rows.copies]
        if rows.real is None:
            out = self._product(x)
        else:
            out = x.new_zeros(*x.shape[:-1], self.out_features)
            out[rows.real] = self._product(x[rows.real])
        return out.repeat_interleave(rows.copies, dim=0) if rows.copies > 1 else out

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b``, handed to oneDNN in slices of at most ``MAX_ROWS_PER_CALL``
        rows, each rounded up to a bucket (``row_bucket``), so that its kernel cache
        stays bounded whatever the batch and prompt lengths."""
        rows = x.reshape(-1, x.shape[-1])
        out = torch.cat([self._bucketed(part) for part in rows.split(MAX_ROWS_PER_CALL)])
        return out.reshape(*x.shape[:-1], self.out_features)

    def _bucketed(self, rows: torch.Tensor) -> torch.Tensor:
        count = rows.shape[0]
        padded = row_bucket(count)
        if padded > count:
            rows = torch.cat([rows, rows.new_zeros(padded - count, rows.shape[1])])
        out = torch.ops.mkldnn._linear_pointwise(
            rows.contiguous(), self.packed, self.bias, "none", [], ""
        )
        return out[:count]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def pack_linear_layers(model: nn.Module) -> int:
    """Swap every fp32 ``nn.Linear`` of a CPU model for a ``PackedLinear``, and build
    the oneDNN kernels they will use.

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
    warm_up(model)
    return len(targets)


def warm_up(model: nn.Module) -> None:
    """Build every kernel the packed layers will ask oneDNN for, now: one per layer
    shape and row count in ``ROW_COUNTS``. Built lazily instead, they arrive as new
    prompt and batch sizes do, and the process grows for thousands of requests
    (measured: +28 MiB over 4,500 varied requests on the tiny model)."""
    shapes = {
        (layer.in_features, layer.out_features, layer.bias is None): layer
        for layer in model.modules()
        if isinstance(layer, PackedLinear)
    }
    with torch.inference_mode():
        for layer in shapes.values():
            for count in ROW_COUNTS:
                layer._bucketed(torch.zeros(count, layer.in_features))
