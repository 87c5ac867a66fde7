"""What every packed linear layer shares, whatever its precision: which rows it computes
and how many it hands to its kernel at once.

Decoding multiplies a few rows (one per conversation in the batch) by every weight
matrix at each step. A kernel subclass (``float32``, ``int8``, ``bfloat16``) only says
how one block of rows is multiplied; this base class decides the blocks.

**Row counts.** A kernel library builds one kernel per row count it is given and keeps
it (oneDNN: about 0.5 MiB of code apiece), and may pick a different algorithm for a
different count. So every call is rounded up to a bucket (``row_bucket``): the kernels
are few, all built at load (``warm_up``), and a row's result never depends on how many
rows share the call as long as each bucket's kernel treats rows independently
(``tests/test_kernels.py`` checks this under every instruction set the CPU has).
oneDNN's float32 kernel for a single row sums in another order on AVX-512 than its
kernel for two or more, so its smallest bucket is 2 (``smallest_call``).

**Skipping rows** (``skip_redundant_rows``) goes one step further for the prompt. A
batch is padded to its longest conversation, and the encoder plus the decoder's
cross-attention keys and values are otherwise computed for every padding position too:
in the benchmark's batch of 32 chit-chat conversations 58% of the 32 x 128 positions
were padding. Inside the context, layers skip those rows (their outputs are zeros,
which the attention masks ignore), so real rows get exactly the values they would get
in a padded batch. Beam search also repeats the encoder output once per beam before
the cross-attention projects it, so with Blenderbot's 10 beams nine of every ten rows
of those projections repeat the first: they are computed once per conversation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

BATCH_HINT = 32
"""The row count kernels pack their weights for: a typical decode batch."""


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

# Rows of padding that bring a product's rows up to their bucket, where the row count is
# symbolic (``padded_by``).
_padding: ContextVar[int | torch.SymInt | None] = ContextVar("padding", default=None)


@contextmanager
def padded_by(padding: int | torch.SymInt) -> Iterator[None]:
    """Pad every product's rows by ``padding`` zero rows: ``row_bucket``'s padding for
    a row count that ``torch.export`` traces as a symbol (a compiled step of any number
    of rows, ``compiled_step``), which Python cannot round; the caller, who knows the
    count, passes it. The kernel then sees the bucket it sees in the eager step."""
    token = _padding.set(padding)
    try:
        yield
    finally:
        _padding.reset(token)


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


def row_bucket(count: int, smallest: int = 1) -> int:
    """``count`` rounded up to 4 steps per doubling past 8 (at most 25% more rows),
    and to ``smallest``. Rows stay independent, so padding never changes a real
    row's result."""
    if count <= 8:
        return max(count, smallest)
    step = 1 << (count.bit_length() - 3)  # a quarter of the power of two below count
    return -(-count // step) * step


# A product never hands a kernel more than this many rows (a long prompt goes in
# slices), so the row counts it sees are the buckets up to here: 28 of them at most,
# built once at load (``warm_up``) rather than one by one over hours of traffic.
MAX_ROWS_PER_CALL = 256


class PackedLinear(nn.Module, ABC):
    """Inference-only replacement for ``nn.Linear``: float32 in, float32 out, the
    weight held in whatever form the subclass's kernel wants."""

    kernel = ""
    """The kernel's name, shown by ``repr``."""
    smallest_call = 1
    """The fewest rows handed to the kernel at once (a single row is padded up to it)."""
    prompt_rows_alone = True
    """Whether a prompt's rows, too, get values that do not depend on the rows beside
    them (not ``Int4Linear``'s bfloat16 prompt kernel under AMX): then prompts may share
    a pass (``model_step.PackedPrompts``)."""
    sums_exactly = False
    """Whether any kernel that computes this product exactly gives the same floats, bit
    for bit (integer sums, scaled without a zero point: ``Int8Linear`` with AMX), so
    that ``compiled_step`` may let inductor choose one."""

    def row_counts(self) -> list[int]:
        """Every row count ``_bucketed`` hands the kernel."""
        calls = range(1, MAX_ROWS_PER_CALL + 1)
        return sorted({row_bucket(n, self.smallest_call) for n in calls})

    @classmethod
    def takes(cls, linear: nn.Linear) -> bool:
        """Whether this kernel can hold ``linear`` (some need whole blocks of inputs)."""
        return True

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Plain attributes, not parameters: packed weights must not reach state_dict,
        # .to() or the optimiser machinery.
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    @abstractmethod
    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        """(count, in) contiguous float32 rows -> (count, out) float32 ``rows @ W.T + b``,
        each output row computed from its own input row alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_rows = _batch_rows.get()  # empty in a decode step, whose shape may be symbolic
        rows = batch_rows.get(x.shape[:-1]) if batch_rows else None
        if rows is None:
            return self._product(x)
        x = x[:: rows.copies]
        if rows.real is None:
            out = self._product(x)
        else:
            out = x.new_zeros(*x.shape[:-1], self.out_features)
            out[rows.real] = self._product(x[rows.real])
        return out.repeat_interleave(rows.copies, dim=0) if rows.copies > 1 else out

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` of (n, in) rows that skip nothing: a decode step's, called by a
        step that holds the layer (``LlamaStep``) without the module call, the
        ``skip_redundant_rows`` lookup and a subclass's checks for prompts."""
        return self._product(x)

    def add_rows(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + rows(x)``, as a residual block adds a layer's output."""
        return residual + self.rows(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b``, handed to the kernel in slices of at most
        ``MAX_ROWS_PER_CALL`` rows, each rounded up to a bucket (``row_bucket``), so
        that its kernel cache stays bounded whatever the batch and prompt lengths."""
        if x.dim() == 2 and x.shape[0] <= MAX_ROWS_PER_CALL:  # LlamaStep's rows: no reshape
            return self._bucketed(x)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= MAX_ROWS_PER_CALL:  # other decode steps: no list, no split
            out = self._bucketed(rows)
        else:
            out = torch.cat([self._bucketed(part) for part in rows.split(MAX_ROWS_PER_CALL)])
        return out.reshape(*x.shape[:-1], self.out_features)

    def _bucketed(self, rows: torch.Tensor) -> torch.Tensor:
        count = rows.shape[0]
        padding = _padding.get()
        if padding is not None:  # a symbolic count (``padded_by``): always a padded copy
            rows = torch.cat([rows, rows.new_zeros(padding, rows.shape[1])])
            return self._multiply(rows)[:count]
        padded = row_bucket(count, self.smallest_call)
        if padded > count:
            rows = torch.cat([rows, rows.new_zeros(padded - count, rows.shape[1])])
        out = self._multiply(rows.contiguous())
        return out if padded == count else out[:count]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kernel}"


def replace_linear_layers(
    model: nn.Module, kernel: type[PackedLinear], keep: frozenset[str] = frozenset()
) -> int:
    """Swap every float32 CPU ``nn.Linear`` of ``model`` that ``kernel`` takes and
    ``keep`` does not name for ``kernel(layer)``, and build the kernels they will use.
    Returns how many were swapped."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and name not in keep
        and kernel.takes(module)
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, kernel(module))
    warm_up(model)
    return len(targets)


def warm_up(model: nn.Module) -> None:
    """Build every kernel the packed layers will ask for, now: one per layer type,
    shape and row count in its ``row_counts()``. Built lazily instead, they arrive as new
    prompt and batch sizes do, and the process grows for thousands of requests
    (measured: +28 MiB over 4,500 varied requests on the tiny model)."""
    shapes = {
        (type(layer), layer.in_features, layer.out_features, layer.bias is None): layer
        for layer in model.modules()
        if isinstance(layer, PackedLinear)
    }
    with torch.inference_mode():
        for layer in shapes.values():
            for count in layer.row_counts():
                layer._bucketed(torch.zeros(count, layer.in_features))
