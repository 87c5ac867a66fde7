"""Linear-layer kernels, one per precision, behind one interface.

A kernel is a ``PackedLinear`` subclass (``rows``): built from an ``nn.Linear`` once at
load (pack, quantize), then called like the layer it replaces, float32 in and out.
Model code never asks which one runs. ``chatbot.engine.precision`` picks one per
``CHATBOT_DTYPE`` and checks it against the CPU (``chatbot.engine.cpu``).

| kernel | weights | activations |
|---|---|---|
| ``Float32Linear`` | float32, oneDNN-packed | float32 |
| ``BFloat16Linear`` | bfloat16, oneDNN-packed | rounded to bfloat16 |
| ``Int8Linear`` | int8, a scale per output channel | int8, a scale per row |
| ``Int4Linear`` | 4 bits, a minimum and step per 32 inputs | rounded to bfloat16 |
| ``RescoredInt8Linear`` (LM head) | int8; float32 for the best candidates | int8; float32 |
| ``RescoredBFloat16Linear`` (LM head) | bfloat16; float32 for the best candidates | float32 |

int8 is multiplied by oneDNN, or by fbgemm on CPUs without VNNI (faster there).
Projections that read the same input share one stacked product (``fused``).
"""

from chatbot.engine.kernels.bfloat16 import BFloat16Linear
from chatbot.engine.kernels.float32 import Float32Linear
from chatbot.engine.kernels.int4 import Int4Linear
from chatbot.engine.kernels.int8 import Int8Linear
from chatbot.engine.kernels.rescored import Rescored, RescoredBFloat16Linear, RescoredInt8Linear
from chatbot.engine.kernels.rows import PackedLinear, replace_linear_layers, skip_redundant_rows

__all__ = [
    "BFloat16Linear",
    "Float32Linear",
    "Int4Linear",
    "Int8Linear",
    "PackedLinear",
    "Rescored",
    "RescoredBFloat16Linear",
    "RescoredInt8Linear",
    "replace_linear_layers",
    "skip_redundant_rows",
]
