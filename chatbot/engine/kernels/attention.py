"""Decode attention for every row of a step in one call, each row as it would be alone.

A decode step attends one new position per row over that row's own keys. SDPA computes
a row's result in another order when the batch or the width changes, so the decode
loop called it once per reply (``model_step.attend_by_run``): at 32 conversations of
Blenderbot-400M in int8, 768 calls a step, which took 163 ms; 107 ms in one call each
(chit-chat prompts of up to 128 tokens, 2-core EPYC).
``attention.c`` does them all in one call: each (row, head) is a dot product per
position, a softmax and a weighted sum, in 16-lane vectors summed in a fixed order, by
the same instructions whatever else is in the call, so a row's values never depend on
the rows beside it, its width or the order of the rows. A row reads its keys from any
row of the buffer (``rows``), which is how a reply's beams read one shared prompt.

It is one of the engine's C kernels (``native``). ``CHATBOT_ATTENTION=sdpa``, or no C
compiler, keeps SDPA everywhere. Every attention of a model goes through
``model_step.attend_per_reply``, so ``generate`` and the decode loop always use the
same one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

import torch

from chatbot.engine.kernels import native

if TYPE_CHECKING:
    from ctypes import CDLL

    from transformers import PreTrainedModel

MAX_DIM = 256
"""What ``attention.c`` takes: head sizes that are a multiple of 8 (16-lane vectors and
an 8-lane one: Blenderbot-400M's heads are 40 wide), up to 256."""


@cache
def library() -> CDLL | None:
    """The C kernels (``native``), unless ``CHATBOT_ATTENTION=sdpa`` (``auto``, the
    default: wherever they build; ``chatbot.settings`` checks the value)."""
    if os.environ.get("CHATBOT_ATTENTION", "auto").strip().lower() == "sdpa":
        return None
    return native.library()


CACHED = (torch.float32, torch.bfloat16)
"""The keys and values it reads: float32, or bfloat16 where a precision caches them in
half the bytes (``precision.Precision.cache``), widened to float32 as they are read."""


def runs_on(model: PreTrainedModel) -> bool:
    """Whether ``model``'s decode steps attend with this kernel (float32 on a CPU)."""
    cpu_float32 = model.device.type == "cpu" and model.dtype == torch.float32
    return cpu_float32 and library() is not None


def applies(query: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether ``attend_rows`` takes this one-position ``query`` over ``keys``."""
    dim = query.shape[-1]
    return (
        query.shape[2] == 1
        and query.dtype == torch.float32
        and keys.dtype in CACHED
        and query.device.type == "cpu"
        and dim % 8 == 0
        and dim <= MAX_DIM
        and query.stride(-1) == keys.stride(-1) == 1
        and library() is not None
    )


def attending() -> Callable[..., torch.Tensor]:
    """``attend_rows`` as the operator where a step is traced (a compiled step calls it
    back) or where ``operators.cpp``'s kernel serves it; elsewhere its Python kernel,
    called straight: a call through the dispatcher must not race the loading of
    ``operators.cpp``'s library, which registers its kernel (``native.operators``)."""
    if torch.compiler.is_compiling() or native.operators_loaded():
        return attend_rows
    return rows_attended


def rows_attended(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """(n, heads, 1, dim) ``query`` row ``i`` attends over ``keys``/``values`` (R,
    kv_heads, width, dim) of row ``rows[i]``, positions ``0 .. lengths[i] - 1``
    (int64, 1 <= lengths <= width, callers' promise); query heads share key heads in
    groups (grouped-query attention). Returns (n, heads, 1, dim), contiguous."""
    n, heads, _, dim = query.shape
    if keys.stride() != values.stride() or keys.shape != values.shape:
        raise ValueError("keys and values must be laid out alike")
    if keys.dtype != values.dtype:
        raise ValueError("keys and values must be of one dtype")
    threads, width = torch.get_num_threads(), keys.shape[2]
    out = torch.empty((n, heads, 1, dim), dtype=query.dtype)
    scratch = torch.empty(threads * width, dtype=torch.float32)
    rows, lengths = rows.contiguous(), lengths.contiguous()
    kernel = library()
    assert kernel is not None, "attend_rows needs the kernel (``applies``)"
    kernel.attend_rows(
        query.data_ptr(), query.stride(0), query.stride(1), keys.data_ptr(), values.data_ptr(),
        keys.dtype == torch.bfloat16, keys.stride(0), keys.stride(1), keys.stride(2),
        rows.data_ptr(), lengths.data_ptr(), n, heads, heads // keys.shape[1], dim,
        scale, out.data_ptr(), threads, scratch.data_ptr(), width,
    )  # fmt: skip
    return out


attend_rows = torch.library.custom_op("chatbot::attend_rows", rows_attended, mutates_args=())
"""``rows_attended`` as an operator, which ``torch.export`` records and a compiled step
calls back (``compiled_step``). Its Python kernel serves tracing and machines without a
C++ compiler; elsewhere ``operators.cpp``'s does the same with no Python (``native``):
14 against 38 us a one-row Blenderbot call, eager."""


@attend_rows.register_fake
def _(query, keys, values, rows, lengths, scale):
    return query.new_empty(query.shape)
