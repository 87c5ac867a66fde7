"""Wall time that counts a GPU's queued work: CUDA calls return before it is done.

Apart from ``bench.py`` so that ``gpu_table.py`` runs on a GPU machine without the
development environment ``bench.py`` imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def wall_seconds(run: Callable[[], object]) -> float:
    """Wall time of ``run``, the GPU's queued work included."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - start
