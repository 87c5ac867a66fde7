"""The precision a model computes in (``CHATBOT_DTYPE``), checked against the device.

As CTranslate2 treats its compute type, precision is a property of the loaded model,
chosen once and refused up front, with a message that names it, where the device cannot
run it. On a CPU the linear layers, nearly all of a step's work, get a kernel of that
precision (``chatbot.engine.kernels``); embeddings, norms and attention stay float32,
and so does the key/value cache, but for int8's (``Precision.cache``). On a GPU the
whole model is cast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from chatbot.engine.kernels import (
    BFloat16Linear,
    Float32Linear,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    RescoredInt8Linear,
    replace_linear_layers,
)
from chatbot.engine.kernels.fused import fuse_projections
from chatbot.engine.precision_names import choose, gpu_present

if TYPE_CHECKING:  # the service's supervisor checks the precision without transformers
    from transformers import PretrainedConfig, PreTrainedModel

LM_HEAD = frozenset({"lm_head"})
"""The layer a precision's body kernel leaves to its head kernel. The LM head decides
which token comes next: rounding its logits changes greedy replies soonest (issue 22
saw an int4 head change a SmolLM2 reply after a dozen tokens), while it is the largest
matrix a decoder-only step reads (SmolLM2's 49,152-word head is as large as its 30
layers together). So ``int4`` and ``int8`` read it in int8 and compute each row's best
candidates again in float32 (``RescoredInt8Linear``): float32's logits where decoding
looks, at a quarter of the bytes, and fast at 32 rows too (ATen's int4 kernel is not).
float32 and bfloat16 keep a float32 head."""


@dataclass(frozen=True)
class Precision:
    """How a model's weights are held and multiplied."""

    name: str
    """As ``/info`` and ``/metrics`` name it: the ``CHATBOT_DTYPE`` value it came from."""
    load_dtype: torch.dtype
    """What the checkpoint is loaded (or on a GPU cast) as."""
    kernel: type[PackedLinear] | None = None
    """The CPU linear-layer kernel; None: float32 layers, packed when asked to be."""
    head: type[PackedLinear] | None = None
    """The LM head's kernel (and that of any layer ``kernel`` cannot take); None:
    float32, packed when asked to be (``LM_HEAD``)."""
    cache: torch.dtype | None = None
    """The key/value cache's dtype; None: the model's. At 32 conversations a decode
    step reads every reply's keys and values (Blenderbot-400M: about 270 MB a step),
    from memory, not the caches, since the weights streamed through them in between;
    int8 keeps them in bfloat16, half the bytes: the attention kernel widens them back
    to float32 exactly (``kernels.attention``), so only their rounding, once, when
    stored, costs quality (``CACHE``)."""


CACHE = torch.bfloat16
"""int8's key/value cache: each key and value rounded to 8 significant bits, as int8's
activations already are (per row). Measured in one sitting (``benchmarks/quality.py``,
SmolLM2-135M-Instruct, a Xeon with AMX): int8's perplexity +2.5% on float32's, against
+3.8% with a float32 cache; 20 against 22 of 200 greedy replies identical to float32's.
Blenderbot-400M at 32 conversations: 441-449 -> 491-572 tokens/s (in process, in turns).
int4 and bfloat16 keep float32: their 32-row steps are bound by their products
(SmolLM2 int4: no faster; Blenderbot-400M bfloat16 below AMX: 2-5% faster), not worth
bfloat16's 9 fewer of 200 greedy replies identical to float32's."""


FLOAT32 = Precision("float32", torch.float32)
CPU_PRECISIONS = {
    "float32": FLOAT32,
    "bfloat16": Precision("bfloat16", torch.float32, BFloat16Linear),
    "int8": Precision("int8", torch.float32, Int8Linear, head=RescoredInt8Linear, cache=CACHE),
    "int4": Precision("int4", torch.float32, Int4Linear, head=RescoredInt8Linear),
    "float16": Precision("float16", torch.float16),  # stock layers: no fast CPU kernel
}


def stored_in_four_bits(config: PretrainedConfig) -> bool:
    """Whether the checkpoint came from a 4-bit GGUF file (llama.cpp's Q4 and IQ4
    formats; ``chatbot.models.checkpoint`` records the format as ``source_weights``)."""
    return str(getattr(config, "source_weights", "")).startswith(("Q4", "IQ4"))


def pick_device() -> torch.device:
    """The GPU when there is one: the engine loads every model there."""
    return torch.device("cuda" if gpu_present() else "cpu")


def resolve(name: str, device: torch.device, four_bit_source: bool = False) -> Precision:
    """The precision ``name`` (a ``CHATBOT_DTYPE`` value) means on ``device``.

    ``auto`` is the fastest precision whose quality loss was measured small
    (``benchmarks/quality.py``, SmolLM2-135M-Instruct's real weights, README's
    Precision table). A checkpoint from a 4-bit GGUF (``four_bit_source``) is served in
    int4: its body's weights are the file's own 4-bit ones again, so quality is the
    file's (perplexity +0.0% against the dequantized float32; greedy replies identical
    in 151 of 200), at a fraction of the bytes a step reads (2.4x float32's speed for
    one conversation, served). Otherwise bfloat16 on CPUs that multiply it
    natively with AVX512_BF16: perplexity +0.1%, 1.4-1.6x float32's served speed (a
    2-core EPYC); float32 on CPUs where bfloat16 is emulated, and on CPUs with AMX,
    where bfloat16 must run below AMX to keep replies batch-invariant
    (``cpu.run_without_amx``) and float32 then measured faster (a 2-core Xeon, the 400M
    model served: 3.87 replies/s against 2.73 at 32 clients, 0.56 against 0.58 at 1).
    int8 is faster than bfloat16 but measured +3.3% perplexity, with greedy replies
    leaving float32's after 8 tokens on average: it is there to be asked for, as int4
    is for a float checkpoint.
    On a GPU ``auto`` is bfloat16 where the GPU has it natively (float32's range, so no
    overflow; half the memory traffic per decode step), float16 on older GPUs.
    """
    chosen = choose(name, device.type == "cuda", four_bit_source)
    return (
        Precision(chosen, getattr(torch, chosen))
        if device.type == "cuda"
        else CPU_PRECISIONS[chosen]
    )


def apply(
    model: PreTrainedModel, precision: Precision, pack_weights: bool, fuse: bool = True
) -> int:
    """Give a CPU model's linear layers the precision's kernel (all but the
    ``LM_HEAD``), the rest its head kernel, and the layers left in float32 oneDNN's
    packed float32 kernel when ``pack_weights``; projections that read the same input
    are stacked into one layer first (``fuse_projections``; ``fuse``), unless the
    model is to keep its stock layers. Returns how many layers were replaced (0 on a GPU,
    whose model is cast whole and only loses cuDNN's attention)."""
    if model.device.type == "cuda":
        decode_without_cudnn_attention()
    if not torch.backends.mkldnn.is_available() or model.device.type != "cpu":
        return 0
    if fuse and (pack_weights or precision.kernel is not None):
        fuse_projections(model)
    replaced = 0
    if precision.kernel is not None:
        replaced += replace_linear_layers(model, precision.kernel, keep=LM_HEAD)
    if precision.head is not None:
        replaced += replace_linear_layers(model, precision.head)
    if pack_weights:
        replaced += replace_linear_layers(model, Float32Linear)
    return replaced


def decode_without_cudnn_attention() -> None:
    """Leave scaled-dot-product attention to flash and memory-efficient kernels on a GPU.

    On Hopper torch prefers cuDNN's attention for bfloat16 and float16, and cuDNN plans
    a graph for each new shape, while a decode step's key length is new every step. On
    an H100 bfloat16 then decoded slower than float32 (Blenderbot 400M, ``generate``: 46
    against 133 tokens/s at one reply, 284 against 1999 at 32); without it the decode
    loop ran 2.0-3.2x faster (``benchmarks/gpu_table.py``). Process-wide, as torch's
    backend switches are."""
    torch.backends.cuda.enable_cudnn_sdp(False)
