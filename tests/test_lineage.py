"""Which rows hold the same values where (``chatbot.engine.lineage``): what a beam
step may leave uncopied."""

from __future__ import annotations

from chatbot.engine.lineage import Lineage


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
