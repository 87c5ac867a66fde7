"""Which key/value rows hold the same values where, so that a beam step copies less.

A beam step gives each beam its parent's keys and values (``RowSlots.reorder``). Beams
of a reply descend from each other: two of them hold the same values up to the step
where their histories parted, and the prompt's keys (a decoder-only reply's) are the
same in all of them. Only the positions from there on need copying.

Every position a row holds has a mark: a number given when the values were written
(by the decode step, or by a prompt's fill, which gives all the reply's rows the same
marks). A copy takes the marks with the values. Two rows hold the same values up to
the first position whose marks differ, and the marks that agree form a prefix (a
mark is given once, at one position, so rows that share it copied it with all that
came before it), which a binary search finds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import count


class Lineage:
    """The marks of each row's positions, rows ``0 .. capacity - 1``."""

    def __init__(self) -> None:
        self.marks: list[list[int]] = []
        self._fresh = count()

    def reserve(self, rows: int) -> None:
        self.marks += [[] for _ in range(rows - len(self.marks))]

    def release(self) -> None:
        self.marks = []

    def filled(self, rows: Iterable[int], length: int) -> None:
        """``rows`` now hold the same values at positions ``0 .. length - 1``."""
        shared = [next(self._fresh) for _ in range(length)]
        for row in rows:
            self.marks[row] = shared

    def wrote(self, positions: Sequence[int]) -> None:
        """Row ``i`` wrote new values at ``positions[i]`` (rows 0..n-1), after which
        it holds nothing."""
        for row, position in enumerate(positions):
            self.marks[row] = [*self.marks[row][:position], next(self._fresh)]

    def copied(self, sources: Sequence[int], targets: Sequence[int]) -> None:
        """Rows ``targets[i]`` took the values of rows ``sources[i]`` (all at once)."""
        taken = [self.marks[source] for source in sources]
        for target, marks in zip(targets, taken, strict=True):
            self.marks[target] = marks  # never changed in place: shared safely

    def shared(self, a: int, b: int, length: int) -> int:
        """How many first positions (up to ``length``) rows ``a`` and ``b`` hold the
        same values at."""
        first, second = self.marks[a], self.marks[b]
        low, high = 0, min(length, len(first), len(second))
        while low < high:  # the positions that agree are a prefix
            middle = (low + high) // 2
            if first[middle] == second[middle]:
                low = middle + 1
            else:
                high = middle
        return low
