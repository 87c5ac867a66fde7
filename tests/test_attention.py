"""The decode attention kernel (``chatbot.engine.kernels.attention``): SDPA's maths for
one query position per row, each row over its own keys, whatever shares the call
(its row independence under every instruction set: ``test_kernels.py``'s probe)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional

from chatbot.engine.kernels import attention
from chatbot.engine.kernels.attention import applies, attend_rows
from chatbot.engine.model_step import Run, Runs, attend_by_run, attend_per_reply

pytestmark = pytest.mark.skipif(
    attention.library() is None, reason="no C compiler: SDPA serves instead"
)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(32, 32, 40), (16, 16, 64), (9, 3, 64), (4, 2, 128), (2, 2, 8), (8, 8, 24)],
)
def test_each_row_gets_sdpa_over_its_own_keys(heads: int, kv_heads: int, dim: int):
    generator = torch.Generator().manual_seed(dim)
    keys, values = torch.randn(2, 6, kv_heads, 50, dim, generator=generator).unbind()
    query = torch.randn(5, heads, 1, dim, generator=generator)
    rows = torch.tensor([0, 3, 3, 5, 1])  # rows 1 and 2 read one shared row
    lengths = torch.tensor([1, 50, 17, 33, 2])
    got = attend_rows(query, keys, values, rows, lengths, 0.3)
    for i, (row, length) in enumerate(zip(rows.tolist(), lengths.tolist(), strict=True)):
        expected = functional.scaled_dot_product_attention(
            query[i : i + 1],
            keys[row : row + 1, :, :length],
            values[row : row + 1, :, :length],
            scale=0.3,
            enable_gqa=heads != kv_heads,
        )
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-5, atol=1e-6)


def test_large_scores_do_not_overflow():
    """The softmax subtracts each row's largest score first, as SDPA does."""
    keys = torch.full((1, 1, 3, 16), 40.0)
    values = torch.arange(48.0).view(1, 1, 3, 16)
    query = torch.full((1, 1, 1, 16), 40.0)
    got = attend_rows(query, keys, values, torch.tensor([0]), torch.tensor([3]), 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0, 0], values[0, 0].mean(0))


def test_scores_far_apart_weigh_as_in_sdpa():
    """The kernel's own exponential (eight lanes at a time, the last ones padded) at
    lengths on both sides of eight, with scores spread over hundreds: positions far
    below the top weigh next to nothing, as in SDPA."""
    generator = torch.Generator().manual_seed(7)
    keys, values = torch.randn(2, 1, 4, 24, 40, generator=generator).unbind()
    query = 30 * torch.randn(6, 4, 1, 40, generator=generator)
    lengths = torch.tensor([1, 7, 8, 9, 16, 24])
    got = attend_rows(query, keys, values, torch.zeros(6, dtype=torch.long), lengths, 1.0)
    for i, length in enumerate(lengths.tolist()):
        expected = functional.scaled_dot_product_attention(
            query[i : i + 1], keys[:, :, :length], values[:, :, :length], scale=1.0
        )
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-5, atol=1e-6)


def test_it_takes_only_what_it_computes():
    keys = torch.zeros(1, 2, 4, 40)
    assert applies(torch.zeros(3, 2, 1, 40), keys)
    assert applies(torch.zeros(3, 2, 1, 40), keys.bfloat16()), "int8's cache"
    assert not applies(torch.zeros(3, 2, 2, 40), keys), "one query position per row"
    assert not applies(torch.zeros(3, 2, 1, 12), torch.zeros(1, 2, 4, 12)), "dim % 8"
    assert not applies(torch.zeros(3, 2, 1, 40).half(), keys.half())
    assert not applies(torch.zeros(3, 2, 1, 512), torch.zeros(1, 2, 4, 512)), "too wide"


@pytest.mark.parametrize("dim", [40, 64, 24])
def test_bfloat16_keys_and_values_are_read_as_their_float32_values(dim: int):
    """int8's cache (``precision.CACHE``): widened as loaded, exactly, so a row gets
    what the float32 kernel gives over the rounded keys, to the bit."""
    generator = torch.Generator().manual_seed(dim)
    keys, values = torch.randn(2, 5, 4, 30, dim, generator=generator).bfloat16().unbind()
    query = torch.randn(5, 4, 1, dim, generator=generator)
    rows, lengths = torch.tensor([0, 1, 1, 3, 4]), torch.tensor([1, 9, 16, 17, 30])
    halves = attend_rows(query, keys, values, rows, lengths, dim**-0.5)
    widened = attend_rows(query, keys.float(), values.float(), rows, lengths, dim**-0.5)
    assert halves.dtype == torch.float32
    assert torch.equal(halves, widened)


def test_where_the_kernel_does_not_apply_sdpa_reads_a_bfloat16_cache_widened():
    keys, values = torch.randn(2, 3, 2, 10, 12).bfloat16().unbind()  # 12: not the kernel's
    query = torch.randn(3, 2, 1, 12)
    runs = Runs([Run(slice(0, 1), 4), Run(slice(1, 3), 10)])
    sdpa = functional.scaled_dot_product_attention
    got = attend_by_run(runs, query, keys, values, sdpa, 12**-0.5)
    wide = keys.float(), values.float()
    assert torch.equal(got[:1], sdpa(query[:1], wide[0][:1, :, :4], wide[1][:1, :, :4]))
    assert torch.equal(got[1:], sdpa(query[1:], wide[0][1:], wide[1][1:]))


def test_a_padded_batch_reads_each_prompt_over_its_own_length():
    """``generate``'s padded batch (adaptive batching): the mask keeps a prefix of each
    row (prompts padded on the right), and each row gets what it gets alone, in the
    decoder's cross-attention from int8's bfloat16 cache, and in the encoder, whose
    padding stays zeros. Other masks (a decoder-only batch, padded on the left) stay
    SDPA's over the widened cache."""
    generator = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 4, 10, 40, generator=generator).bfloat16().unbind()
    query = torch.randn(3, 4, 1, 40, generator=generator)
    prompts = torch.randn(3, 4, 10, 40, generator=generator)  # every position of each
    lengths = [10, 4, 7]
    right = (torch.arange(10) < torch.tensor(lengths)[:, None])[:, None, None]
    module = torch.nn.Module()
    got, _ = attend_per_reply(module, query, keys, values, right)
    encoded, _ = attend_per_reply(module, prompts, keys.float(), values.float(), right)
    for i, length in enumerate(lengths):
        own = keys[i : i + 1, :, :length], values[i : i + 1, :, :length]
        alone, _ = attend_per_reply(module, query[i : i + 1], *own, None)
        assert torch.equal(got[i : i + 1], alone)
        own = tuple(t.float() for t in own)
        alone, _ = attend_per_reply(module, prompts[i : i + 1, :, :length], *own, None)
        assert torch.equal(encoded[i : i + 1, :length], alone)
        assert not encoded[i, length:].any()
    left = right.flip(-1)
    got, _ = attend_per_reply(module, query, keys, values, left)
    expected = functional.scaled_dot_product_attention(query, keys.float(), values.float(), left)
    assert torch.equal(got, expected.transpose(1, 2))


def test_sdpa_can_be_chosen_instead():
    """``CHATBOT_ATTENTION=sdpa``: the kernel is never built, every attention is SDPA."""
    code = "from chatbot.engine.kernels import attention; print(attention.library())"
    env = {**os.environ, "CHATBOT_ATTENTION": "sdpa", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "None", done.stderr
