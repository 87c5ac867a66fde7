"""int8 weights and int8 activations, each row scaled on its own: fast and batch-invariant.

Weights are quantized once, symmetrically, with one scale per output channel (row of
W). Activations are quantized at each call with one scale per input row (its absolute
maximum over 127), so a row's integers depend on that row alone. oneDNN multiplies
the 8-bit activations by the signed weights and sums in 32-bit integers, which is
exact: the product of a row is the same whatever rows share the call and whichever
kernel the row count selects. The row's and the channel's scales are applied
afterwards, element by element.

Where AMX multiplies them, the activations go to oneDNN as signed bytes, with no zero
point. Then every exact kernel computes the same floats from the same sums, so the
compiled one-row step may let inductor pick its own (``sums_exactly``): with the usual
unsigned activations (the signed values shifted by 128, the zero point), a kernel must
take the shift's sum back out, which oneDNN does in integers and inductor's AMX kernel
in float32 after scaling, one rounding more. Elsewhere they stay unsigned: there oneDNN
multiplies signed activations with its reference code (measured 1,000x slower with
AVX512_VNNI or AVX-VNNI, 2x without VNNI).

Without VNNI (AVX2, AVX-512 without VNNI) oneDNN shifts the activations into unsigned
bytes and adds each pair of u8 x s8 products in a saturating 16-bit sum first
(``vpmaddubsw``): 2 x 255 x 127 overflows it, and measured rows came out 15% off.
There the weights take 7 bits (-63..63), as fbgemm's ``reduce_range`` does for the
same reason, and every sum is exact again.

Without VNNI, fbgemm multiplies instead (``fbgemm_multiplies``): oneDNN's u8 x s8
kernel took 3.5-4.7x fbgemm's time for 1 to 8 rows, and 1.5-1.7x for 32, on a 2-core
AVX2 EPYC (slower than float32 for one row). fbgemm is handed each row's integers
with a scale of 1 and the same 7-bit weights, so its sums are as exact and its floats
are the same integer sum times the channel's scale; the row's scale comes after, as
for oneDNN. ``torch.ao``'s dynamic quantization (fbgemm too) picks one activation
scale per call instead, so a row's result there depends on the rows beside it;
``torch._int_mm`` (signed x signed) is exact but falls back to a slow path without
AVX-512 VNNI (135 ms for one row of 1,280 by 5,120 there).
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from chatbot.engine.cpu import at_least, cpu_isa
from chatbot.engine.kernels import native
from chatbot.engine.kernels.rows import BATCH_HINT, PackedLinear

_TINY = torch.finfo(torch.float32).tiny
_FBGEMM_PRODUCT = "linear_with_input_q_dq_qweight_dq_output_fp32"


def vnni() -> bool:
    """Whether this CPU sums u8 x s8 products in 32 bits (AVX512_VNNI, AVX-VNNI, AMX)."""
    return at_least("avx512_core_vnni") or cpu_isa() == "avx2_vnni"  # AMX: newer still


def weight_range() -> int:
    """The largest quantized weight magnitude whose sums this CPU keeps exact."""
    return 127 if vnni() else 63


def fbgemm_multiplies() -> bool:
    """Whether fbgemm multiplies the int8 rows (CPUs without VNNI, a torch that has
    it), not oneDNN."""
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    return not vnni() and fbgemm and hasattr(torch.ops.quantized, _FBGEMM_PRODUCT)


def absmax_scales(x: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """(rows, 1) scales that map each row's largest magnitude to ``levels`` (never 0)."""
    return (x.abs().amax(dim=1, keepdim=True) / levels).clamp_(min=_TINY)


def activation_zero_point() -> int:
    """0 (signed activations) where AMX multiplies them, 128 (unsigned) elsewhere."""
    return 0 if at_least("avx512_core_amx") else 128


def quantize_rows(rows: torch.Tensor, zero_point: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, in) float32 -> bytes (int8, or uint8 shifted by ``zero_point``), and each
    row's (count, 1) scale: in one pass of ``quantize.c`` where it runs (the same bytes
    as these operations, which a compiled step traces and fuses)."""
    kernel = native.library()
    if kernel is not None and not torch.compiler.is_compiling() and rows.stride(1) == 1:
        count, features = rows.shape
        out = torch.empty((count, features), dtype=torch.uint8 if zero_point else torch.int8)
        scales = torch.empty((count, 1))
        kernel.quantize_rows(
            rows.data_ptr(), count, features, rows.stride(0), 127.0, zero_point,
            out.data_ptr(), scales.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out, scales
    scales = absmax_scales(rows)
    quantized = rows.div(scales).round_()
    if zero_point:
        return quantized.add_(zero_point).to(torch.uint8), scales
    return quantized.to(torch.int8), scales


class Int8Linear(PackedLinear):
    kernel = "onednn int8, rowwise"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight = linear.weight.detach().float()
        self.weight_scales = absmax_scales(weight, weight_range()).squeeze(1)
        quantized = weight.div(self.weight_scales[:, None]).round_().to(torch.int8)
        self.fbgemm_weights = FbgemmWeights.of(quantized, self.weight_scales)
        if self.fbgemm_weights is None:
            hint = [BATCH_HINT, self.in_features]
            self.packed = torch.ops.onednn.qlinear_prepack(quantized, hint)
            self._no_zero_points = torch.zeros(self.out_features, dtype=torch.int32)
            self.zero_point = activation_zero_point()
            self.sums_exactly = self.zero_point == 0
        else:  # fbgemm takes each row's signed integers, as floats
            self.kernel = self.kernel.replace("onednn", "fbgemm")
            self.zero_point = 0

    def _multiply(self, rows: torch.Tensor) -> torch.Tensor:
        quantized, scales = quantize_rows(rows, self.zero_point)
        if self.fbgemm_weights is not None:
            out = self.fbgemm_weights.product(quantized.float())
        else:
            out = torch.ops.onednn.qlinear_pointwise(
                quantized, 1.0, self.zero_point, self.packed, self.weight_scales,
                self._no_zero_points, None, 1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        return scale_rows(out, scales, self.bias)


class FbgemmWeights:
    """A layer's int8 weights packed for fbgemm, found by ``name``: the digest of the
    weights and their scales. A compiled step cannot hold fbgemm's packed weights (a
    TorchScript object ``torch.export`` does not take), so its program calls
    ``fbgemm_product`` with the name, which any process that loaded the same model
    knows, and the package holds no copy of them."""

    loaded: ClassVar[weakref.WeakValueDictionary[str, FbgemmWeights]] = (
        weakref.WeakValueDictionary()
    )
    """Every model's, while the model lives."""

    def __init__(self, name: str, packed: torch.ScriptObject, out_features: int) -> None:
        self.name, self.packed, self.out_features = name, packed, out_features

    def product(self, levels: torch.Tensor) -> torch.Tensor:
        """``fbgemm_product`` of ``levels``: the operator where a step is traced, else
        fbgemm's own call (the operator adds its dispatch and a lookup by name)."""
        if torch.compiler.is_compiling():
            return fbgemm_product(levels, self.name)
        return _fbgemm(levels, self.packed)

    @classmethod
    def of(cls, quantized: torch.Tensor, scales: torch.Tensor) -> FbgemmWeights | None:
        """(out, in) int8 ``quantized`` weights with a float32 scale per row, packed
        for fbgemm where it multiplies (``fbgemm_multiplies``); None elsewhere."""
        if not fbgemm_multiplies():
            return None
        digest = hashlib.blake2b(quantized.numpy().tobytes(), digest_size=16)
        digest.update(scales.numpy().tobytes())
        name = f"{quantized.shape[0]}x{quantized.shape[1]}-{digest.hexdigest()}"
        if (known := cls.loaded.get(name)) is not None:
            return known
        zero_points = torch.zeros(quantized.shape[0], dtype=torch.long)
        with warnings.catch_warnings(), _engine("fbgemm"):
            # torch calls quantized tensors deprecated; fbgemm's packing still takes one
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(
                quantized, scales.double(), zero_points, 0
            )
            packed = torch.ops.quantized.linear_prepack(weight, None)
        weights = cls(name, packed, quantized.shape[0])
        cls.loaded[name] = weights
        if native.operators_loaded():  # else ``keep_all`` does, when they load
            weights.keep()
        return weights

    def keep(self) -> None:
        """Hand the weights to ``operators.cpp``'s kernel under their name, while they live."""
        torch.ops.chatbot.keep_fbgemm(self.name, self.packed)
        forget = torch.ops.chatbot.forget_fbgemm
        weakref.finalize(self, forget, self.name, self.packed).atexit = False  # the end frees them

    @classmethod
    def keep_all(cls) -> None:
        """``keep`` every model's weights: ``operators.cpp``'s library has just loaded."""
        for weights in list(cls.loaded.values()):
            weights.keep()


native.when_operators_load(FbgemmWeights.keep_all)


@contextmanager
def _engine(name: str) -> Iterator[None]:
    """torch's quantized engine set to ``name`` (which packs the weights) meanwhile."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


@torch.library.custom_op("chatbot::int8_fbgemm", mutates_args=())
def fbgemm_product(levels: torch.Tensor, weights: str) -> torch.Tensor:
    """(count, in) float32 ``levels`` (each row's integers, -127..127) times the int8
    weights named ``weights`` (``FbgemmWeights``): (count, out) float32, each the exact
    integer sum times its channel's scale. fbgemm quantizes the levels again with a
    scale of 1 and a zero point of 128: the same integers, as bytes.

    This Python kernel serves tracing and machines without a C++ compiler; elsewhere
    ``operators.cpp``'s does the same with no Python (``native``), which is what a
    compiled step calls back 70 times a Blenderbot-400M token."""
    return _fbgemm(levels, FbgemmWeights.loaded[weights].packed)


def _fbgemm(levels: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    return getattr(torch.ops.quantized, _FBGEMM_PRODUCT)(levels, 1.0, 128, packed)


@fbgemm_product.register_fake
def _(levels, weights):
    return levels.new_empty(levels.shape[0], FbgemmWeights.loaded[weights].out_features)


def scale_rows(out: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out * scales (+ bias)`` in place: one pass of ``quantize.c`` where it runs."""
    kernel = native.library()
    if kernel is None or torch.compiler.is_compiling() or not out.is_contiguous():
        out = out.mul_(scales)
        return out if bias is None else out.add_(bias)
    bias = None if bias is None else bias.contiguous()  # held until the call returns
    count, width = out.shape
    bias_at = None if bias is None else bias.data_ptr()
    kernel.scale_rows(
        out.data_ptr(), count, width, scales.data_ptr(), bias_at, torch.get_num_threads()
    )
    return out
