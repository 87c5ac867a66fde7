"""Which rows hold the same values where (``chatbot.engine.lineage``): what a beam
step may leave uncopied."""

from __future__ import annotations

import torch

from chatbot.engine.lineage import Lineage
from chatbot.engine.slots import RowSlots


def test_beams_share_their_prompt_and_what_they_copied_until_they_write():
    lineage = Lineage()
    lineage.reserve(3)
    lineage.filled(range(3), 5)  # a prompt of 5 in three beams
    assert lineage.shared(0, 2, 5) == 5
    lineage.wrote([5, 5, 5])  # each beam's own token
    assert [lineage.shared(0, other, 6) for other in (1, 2)] == [5, 5]
    lineage.copied([0, 0], [1, 2])  # beams 1 and 2 continue beam 0
    assert lineage.shared(1, 2, 6) == 6
    lineage.wrote([6, 6, 6])
    assert lineage.shared(1, 2, 7) == 6
    assert lineage.shared(0, 1, 7) == 6


def test_a_row_that_moves_takes_its_marks_and_a_new_prompt_shares_nothing_old():
    lineage = Lineage()
    lineage.reserve(4)
    lineage.filled(range(2), 3)
    lineage.filled(range(2, 4), 3)  # another reply's prompt: other marks
    assert lineage.shared(1, 2, 3) == 0
    lineage.copied([2, 3], [0, 1])  # the first reply left; the second moved up
    assert lineage.shared(0, 1, 3) == 3
    assert lineage.shared(0, 2, 3) == 3  # row 2 still holds what it held


def test_a_row_rewritten_earlier_holds_nothing_past_it():
    lineage = Lineage()
    lineage.reserve(2)
    lineage.filled(range(2), 4)
    lineage.wrote([4, 1])  # row 1 is a new reply's, written from position 1
    assert lineage.shared(0, 1, 5) == 1


def test_a_beam_step_gives_each_row_its_parents_values_even_when_rows_swap():
    """``RowSlots.reorder`` copies each moving row from its own first differing position
    (``reorder.c``, or torch's indexing without a C compiler), reading every parent
    before writing any row: rows 0 and 1 swap, row 2 continues row 0."""
    slots = RowSlots(2, 3, 16, 8, torch.float32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for layer in range(2):
        prompt = torch.randn(1, 3, 4, 8, generator=generator)
        slots.fill(layer, slice(0, 4), prompt, prompt + 1)
    for position in (4, 5):  # every row writes values of its own
        slots.reserve(4, position + 1)
        slots.advance([position] * 4)
        at = slots.at(torch.full((4,), position))
        for layer in range(2):
            new = torch.randn(4, 3, 1, 8, generator=generator)
            slots.write(layer, at, new, -new)
    parents = torch.tensor([1, 0, 0, 3])
    expected = [buffer[parents].clone() for buffer in (*slots.keys, *slots.values)]
    slots.reorder(0, parents)
    for buffer, want in zip((*slots.keys, *slots.values), expected, strict=True):
        assert torch.equal(buffer[:4, :, :6], want[:, :, :6])
