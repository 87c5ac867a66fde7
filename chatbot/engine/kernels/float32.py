"""float32 weights pre-packed for oneDNN: the exact CPU path.

PyTorch's default CPU route for decode shapes (MKL ``addmm``) is slow on small row
counts: on the 2-core benchmark machine a 1280x5120 layer took 10.3 ms for 8 rows,
against 1.8 ms for 1, so batching barely paid. The same product through oneDNN with the
weight reordered once into its blocked layout takes 2.9 ms for 8 rows and runs at
54 GFLOP/s for 32 (MKL: 27). This is what TorchInductor's weight freezing does, without
the compile step.
"""

from __future__ import annotations

import torch
from torch import nn

from chatbot.engine.kernels.rows import BATCH_HINT, PackedLinear


class Float32Linear(PackedLinear):
    kernel = "onednn float32"
    smallest_call = 2
    """oneDNN's float32 kernel for one row sums in another order on AVX-512 than its
    kernel for 2 to 256 (seen: up to 2.6e-6 apart), so one row is multiplied as two."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach().float(), BATCH_HINT
        )

    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
