"""Key/value rows that running replies check in and out of, between decode steps.

Row ``i`` of every buffer belongs to one row of the decode batch (a reply, or one beam
of a reply), and the running rows are always ``0 .. n-1``, so a step reads each layer's
keys as one slice, never a gather. A reply that finishes leaves a hole that the rows
behind it move into; a beam step reorders its group's rows in place. A new token is
written in place at its own position. Rows and positions grow by doubling when needed
(rows up to the scheduler's row budget, positions up to the model's context), so a
model with a long context costs memory for the lengths actually used. They never shrink
while replies run; once the loop goes idle it gives them back (``release``), so a burst
of long replies does not keep its memory for good.
"""

from __future__ import annotations

import ctypes
from functools import partial

import torch

from chatbot.engine.kernels import native
from chatbot.engine.lineage import Lineage


class RowSlots:
    """Per-layer key and value buffers of shape (rows, heads, positions, head_dim)."""

    def __init__(
        self,
        layers: int,
        heads: int,
        positions: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.heads, self.head_dim, self.max_positions = heads, head_dim, positions
        self.dtype, self.device = dtype, device
        self.written = 0
        """Positions that hold values in some row, at most (``fill`` and ``advance``
        raise it; see ``reorder``)."""
        self.lineage = Lineage()
        self.keys = [self._empty(0, 0) for _ in range(layers)]
        self.values = [self._empty(0, 0) for _ in range(layers)]

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> RowSlots:
        """Slots whose buffers are ``keys`` and ``values`` as they are (a compiled
        step's inputs, ``compiled_step``), read and written in place."""
        _, heads, positions, head_dim = keys[0].shape
        slots = cls(0, heads, positions, head_dim, keys[0].dtype, keys[0].device)
        slots.keys, slots.values = list(keys), list(values)
        return slots

    def random_rows(self, capacity: int, generator: torch.Generator, rows: int = 1) -> RowSlots:
        """New slots shaped like these, ``rows`` rows of ``capacity`` positions of
        random values (a compiled step's example inputs)."""
        scratch = RowSlots(
            len(self.keys), self.heads, capacity, self.head_dim, self.dtype, self.device
        )
        scratch.reserve(rows, capacity)
        for buffer in (*scratch.keys, *scratch.values):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
        return scratch

    def buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's keys and values: what a compiled batch reads and writes."""
        return list(self.keys), list(self.values)

    def row_views(self, row: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One row of every layer's keys and of its values, as (1, heads, width, dim)
        views: what a compiled one-row step reads and writes."""
        return [k[row : row + 1] for k in self.keys], [v[row : row + 1] for v in self.values]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[0]

    @property
    def width(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, rows: int, positions: int = 1) -> None:
        """Room for ``rows`` running rows of ``positions`` each (contents kept)."""
        if rows <= self.capacity and positions <= self.width:
            return
        size = max(rows, 2 * self.capacity) if rows > self.capacity else self.capacity
        width = self.width
        if positions > width:
            width = min(max(positions, 2 * width, 16), self.max_positions)
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                grown = self._empty(size, width)
                grown[: old.shape[0], :, : old.shape[2]] = old
                buffers[layer] = grown
        self.lineage.reserve(size)

    def release(self) -> None:
        """Give every buffer back (the next ``reserve`` allocates anew)."""
        self.keys = [self._empty(0, 0) for _ in self.keys]
        self.values = [self._empty(0, 0) for _ in self.values]
        self.written = 0
        self.lineage.release()

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``write`` stores a step's new position of rows 0..n-1 (``positions``
        has one per row): made once per step, for every layer."""
        return torch.arange(positions.shape[0], device=self.device), positions

    def advance(self, positions: list[int]) -> None:
        """Rows 0..n-1 write their ``positions`` this step (``write``, every layer)."""
        self.written = max(positions) + 1  # every running row takes part in the step
        self.lineage.wrote(positions)

    def write(
        self,
        layer: int,
        at: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Store one new position per row (``at``): ``keys``/``values`` are (n, heads,
        1, dim) for rows 0..n-1."""
        rows, positions = at
        self.keys[layer][rows, :, positions] = keys[:, :, 0].to(self.dtype)
        self.values[layer][rows, :, positions] = values[:, :, 0].to(self.dtype)

    def fill(self, layer: int, rows: slice, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a prompt's positions 0..L-1 (``keys`` (1 or len(rows), heads, L, dim))."""
        length = keys.shape[2]
        self.reserve(rows.stop, length)
        self.written = max(self.written, length)
        self.lineage.filled(range(rows.start, rows.stop), length)
        self.keys[layer][rows, :, :length] = keys.to(self.dtype)
        self.values[layer][rows, :, :length] = values.to(self.dtype)

    def view(self, layer: int, rows: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.keys[layer][:rows, :, :positions],
            self.values[layer][:rows, :, :positions],
        )

    def move(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy rows ``source`` into rows ``target`` (disjoint), every layer."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target] = buffer[source]
        self.lineage.copied(source.tolist(), target.tolist())

    def reorder(self, first: int, parents: torch.Tensor) -> None:
        """Rows ``first + i`` take the contents of rows ``first + parents[i]``. Only
        rows whose parent is another row are copied, and only the positions from the
        first at which the two differ (``Lineage``) to the last written: whole rows of
        a 10-beam Blenderbot-400M reply were up to 150 MB a step."""
        moved = [(first + p, first + i) for i, p in enumerate(parents.tolist()) if p != i]
        if not moved:
            return
        written = self.written
        starts = [self.lineage.shared(source, target, written) for source, target in moved]
        self.lineage.copied(*zip(*moved, strict=True))
        pairs = zip(moved, starts, strict=True)
        spans = [(source, target, start) for (source, target), start in pairs if start < written]
        if spans:
            self._copy_spans(spans)

    def _copy_spans(self, spans: list[tuple[int, int, int]]) -> None:
        """Row ``target`` takes row ``source``'s positions ``start .. written - 1``, for
        each (source, target, start), all at once, in every buffer: one pass of
        ``reorder.c`` each where it runs (each pair from its own start; bfloat16 moved
        as float32 pairs, head sizes being even), else torch's gather and scatter (from
        the earliest start)."""
        buffers = [*self.keys, *self.values]
        kernel = native.library() if self.device.type == "cpu" else None
        if kernel is None or self.dtype not in (torch.float32, torch.bfloat16):
            at = partial(torch.tensor, device=self.device)
            sources, targets, starts = zip(*spans, strict=True)
            rows_from, rows_to = at(sources), at(targets)
            positions = slice(min(starts), self.written)
            for buffer in buffers:
                buffer[rows_to, :, positions] = buffer[rows_from, :, positions]
            return
        buffers = [buffer.view(torch.float32) for buffer in buffers]
        dim = buffers[0].shape[-1]
        sources, targets, starts = torch.tensor(spans).T.contiguous()
        copied = int((self.written - starts).sum()) * self.heads * dim
        scratch = torch.empty(copied, dtype=torch.float32)
        pointers = (ctypes.c_void_p * len(buffers))(*[b.data_ptr() for b in buffers])
        rows, heads = buffers[0].stride(0), buffers[0].stride(1)
        kernel.copy_spans(
            pointers, len(buffers), rows, heads, dim, self.heads,
            sources.data_ptr(), targets.data_ptr(), starts.data_ptr(), len(spans),
            self.written, scratch.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip

    def _empty(self, rows: int, positions: int) -> torch.Tensor:
        # Zeros, not empty: a masked position still enters attention's value product.
        shape = (rows, self.heads, positions, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)
