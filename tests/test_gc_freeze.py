"""What a load leaves behind is frozen out of the collector's reach, its garbage is not
(``chatbot.engine.gc_freeze``)."""

from __future__ import annotations

import gc
import weakref

from chatbot.engine.gc_freeze import frozen_after_loading


class Node:
    """An object that can refer to itself: garbage only the cycle collector finds."""

    other: Node


def test_what_a_load_leaves_is_frozen_and_its_garbage_collected():
    frozen_before = gc.get_freeze_count()
    with frozen_after_loading():
        assert not gc.isenabled()
        loaded = [[index] for index in range(1000)]  # lists: objects the collector tracks
        garbage = Node()
        garbage.other = garbage
        collected = weakref.ref(garbage)
        del garbage
        assert collected() is not None  # no collection while loading
    assert gc.isenabled()
    assert collected() is None
    assert gc.get_freeze_count() >= frozen_before + len(loaded)


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    try:
        with frozen_after_loading():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
