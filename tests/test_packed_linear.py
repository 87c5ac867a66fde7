"""oneDNN pre-packed linear layers: same maths as nn.Linear, rows independent of batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.continuous import ContinuousBatcher
from chatbot.engine.packed_linear import (
    MAX_ROWS_PER_CALL,
    PackedLinear,
    onednn_available,
    pack_linear_layers,
    skip_redundant_rows,
)
from chatbot.schemas import ChatRequest

pytestmark = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (3, 1, 96), (4, 9, 96)])
def test_packed_linear_computes_what_nn_linear_computes(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected, packed = linear(x), PackedLinear(linear)(x)
    assert packed.shape == expected.shape
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """What keeps a batched reply identical to the reply computed alone."""
    torch.manual_seed(0)
    layer = PackedLinear(nn.Linear(1280, 5120))
    batch = torch.randn(48, 1280)
    with torch.inference_mode():
        together = layer(batch)
        for size in (1, 5, 16):
            assert torch.equal(layer(batch[:size]), together[:size])


def test_a_long_input_goes_in_slices_with_the_same_result():
    torch.manual_seed(0)
    linear = nn.Linear(48, 80)
    x = torch.randn(3, MAX_ROWS_PER_CALL + 90, 48)  # slices of 256 and 90 rows (bucket 96)
    with torch.inference_mode():
        packed = PackedLinear(linear)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(packed(x)[:, -5:], packed(x[:, -5:]))


def test_a_non_contiguous_input_is_handled():
    linear = nn.Linear(32, 8)
    x = torch.randn(32, 8).t()  # a transposed view
    assert not x.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x))


def test_the_engine_packs_every_linear_layer_and_keeps_the_logits(tiny_checkpoint: Path):
    stock = ChatEngine.load(tiny_checkpoint, "stock", pack_weights=False)
    packed = ChatEngine.load(tiny_checkpoint, "packed")
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    assert sum(type(m) is PackedLinear for m in packed.model.modules()) == sum(
        type(m) is nn.Linear for m in stock.model.modules()
    )
    inputs = {
        "input_ids": torch.tensor([[5, 17, 42, 2]]),
        "decoder_input_ids": torch.tensor([[1, 9]]),
    }
    with torch.inference_mode():
        torch.testing.assert_close(
            packed.model(**inputs).logits, stock.model(**inputs).logits, rtol=1e-4, atol=1e-4
        )


def test_packing_leaves_other_dtypes_alone():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8))
    assert pack_linear_layers(model) == 1
    assert type(model[0]) is nn.Linear
    assert type(model[1]) is PackedLinear


def test_skipping_padding_keeps_every_real_positions_output(engine: ChatEngine):
    """The encoder of a padded batch gives real positions the same states with or
    without computing the padding, and generate's beam copies are covered too."""
    texts = ["hi", "a much longer message than hi"]
    ids = [engine.encode(request).input_ids for request in _requests(texts)]
    inputs = engine.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    real = inputs["attention_mask"].bool()
    assert not real.all()
    encoder = engine.model.get_encoder()
    with torch.inference_mode():
        padded = encoder(**inputs).last_hidden_state
        with skip_redundant_rows(inputs["attention_mask"], copies=3):
            skipped = encoder(**inputs).last_hidden_state
            beams = {k: v.repeat_interleave(3, dim=0) for k, v in inputs.items()}
            skipped_beams = encoder(**beams).last_hidden_state
    assert torch.equal(skipped[real], padded[real])
    assert not torch.equal(skipped, padded)  # the padding really was skipped
    real_beams = real.repeat_interleave(3, dim=0)
    assert torch.equal(skipped_beams[real_beams], padded.repeat_interleave(3, dim=0)[real_beams])


def _requests(texts: list[str], **options) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": t}], **options) for t in texts]


def kernels_built(capfd: pytest.CaptureFixture[str], work: Callable[[], object]) -> list[str]:
    """The oneDNN products (inner_product) whose kernel ``work`` had to build: oneDNN's
    verbose mode prints a ``cache_miss`` line for each one it creates."""
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        work()
    printed = capfd.readouterr().out.splitlines()
    return [line for line in printed if "cache_miss" in line and "inner_product" in line]


@pytest.mark.parametrize("family", ["engine", "chat_engine"], ids=["blenderbot", "decoder-only"])
def test_after_loading_no_batch_or_prompt_size_builds_a_kernel(family, request, capfd):
    """Kernels are built per row count and kept: all of them are built at load, so a
    service's memory does not creep up as new prompt and batch sizes arrive."""
    engine: ChatEngine = request.getfixturevalue(family)
    sentence = "so what do you like to do on weekends with your friends "
    conversations = [sentence[: 3 + 5 * n] * (1 + n // 4) for n in range(24)]  # 3 to 600 chars

    def varied_traffic() -> None:
        for size, beams in ((1, 1), (3, 4), (7, 1), (24, 1), (5, 10)):
            options = {"num_beams": beams, "max_new_tokens": 6}
            engine.generate(_requests(conversations[:size], **options))

        async def decode_loop() -> None:  # rows come and go at every step
            batcher = ContinuousBatcher(engine, 128, 256)
            try:
                await asyncio.gather(*(batcher.reply(r) for r in _requests(conversations)))
            finally:
                batcher.close()

        asyncio.run(decode_loop())

    assert kernels_built(capfd, varied_traffic) == []


def test_a_kernel_being_built_is_seen(capfd):
    """What the test above relies on: a layer of a shape not packed before builds one."""
    new_shape = PackedLinear(nn.Linear(24, 40))
    assert len(kernels_built(capfd, lambda: new_shape(torch.randn(5, 24)))) == 1
