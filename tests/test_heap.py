"""Freed memory goes back to the system (chatbot.engine.heap)."""

from __future__ import annotations

import psutil
import pytest

from chatbot.engine.heap import release_freed_memory


def test_memory_freed_below_live_allocations_goes_back_to_the_system():
    """The decode loop's pattern: many blocks freed, a few kept above them. glibc keeps
    the freed ones resident until asked; release_freed_memory asks."""
    blocks = [bytearray(4000) for _ in range(50_000)]  # about 200 MB from malloc
    kept = blocks[::100]  # pins the top of the heap
    del blocks
    process = psutil.Process()
    before = process.memory_info().rss
    if not release_freed_memory():
        pytest.skip("not glibc: no malloc_trim")
    released = before - process.memory_info().rss
    assert released > 100 * 2**20, f"released only {released / 2**20:.0f} MiB"
    assert len(kept) == 500
