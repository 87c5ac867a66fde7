"""oneDNN pre-packed linear layers: same maths as nn.Linear, rows independent of batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.packed_linear import (
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


def _requests(texts: list[str]) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": t}]) for t in texts]
