"""What decides whether a compiled one-row step may serve (``compiled_step.verified``):
the eager layers' outputs and key/value writes, bit for bit. The layers of the same
model pass; the layers of a model whose weights differ in one norm do not. (Building,
caching and serving a package on the real offline model, and its replies against the
eager step's, are ``make run``'s test: tests/test_offline_model.py.) Inductor picks its
own kernels only for products that every exact kernel computes alike: int8 layers and
int4's and int8's head, where AMX takes int8 activations without a zero point."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from test_engine import PROMPTS, request
from transformers import PreTrainedModel

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.compiled_step import (
    attach,
    exact_head,
    head_verified,
    package_name,
    sums_exactly,
    verified,
)
from chatbot.engine.continuous import ContinuousBatcher
from chatbot.engine.encoder_decoder_step import EncoderDecoderStep
from chatbot.engine.kernels.cpu import at_least
from chatbot.engine.llama_step import LlamaStep
from chatbot.schemas import ChatReply


def final_norm(model: PreTrainedModel) -> torch.Tensor:
    """The weight of the norm after the last decoder layer."""
    decoder = model.get_decoder()
    return (decoder.layer_norm if hasattr(decoder, "layer_norm") else decoder.norm).weight


@pytest.mark.parametrize(
    ("checkpoint", "family"),
    [("tiny_checkpoint", EncoderDecoderStep), ("tiny_chat_checkpoint", LlamaStep)],
    ids=["blenderbot", "llama"],
)
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_only_layers_that_give_the_eager_values_pass(
    request: pytest.FixtureRequest, checkpoint: str, family: type, dtype: str
):
    path = request.getfixturevalue(checkpoint)
    step = ChatEngine.load(path, checkpoint, dtype=dtype).model_step()
    assert isinstance(step, family)
    assert verified(step, step.one_row_layers())

    other = ChatEngine.load(path, checkpoint, dtype=dtype).model_step()
    assert isinstance(other, family)
    with torch.no_grad():
        final_norm(other.model).mul_(1.5)
    assert not verified(step, other.one_row_layers())


@pytest.mark.server  # builds the package in a subprocess, as the service does
def test_a_compiled_blenderbot_step_writes_the_replies_of_generate_alone(
    tiny_checkpoint: Path, tmp_path: Path
):
    """The package built, verified and attached as the service does it; then each reply
    runs alone (one row: the compiled layers) and equals ``generate``'s."""
    engine = ChatEngine.load(tiny_checkpoint, "tiny-blenderbot", dtype="int8")
    requests = [request(p, num_beams=1, max_new_tokens=16) for p in PROMPTS]

    async def one_at_a_time() -> list[ChatReply]:
        batcher = ContinuousBatcher(engine, 8, 8)
        try:
            step = batcher.loop.step
            assert isinstance(step, EncoderDecoderStep)
            # Not niced, unlike the service's build: beside the suite's other lane a
            # niced build waited minutes for the cores.
            said = attach(step, tiny_checkpoint, "int8", True, tmp_path, niceness=0)
            assert said.startswith("one-row step compiled"), said
            assert step.one_row is not None
            return [await batcher.reply(r) for r in requests]
        finally:
            batcher.close()

    assert asyncio.run(one_at_a_time()) == [engine.generate([r])[0] for r in requests]


def test_a_package_is_named_by_all_it_depends_on(tiny_chat_checkpoint: Path, tmp_path: Path):
    model = shutil.copytree(tiny_chat_checkpoint, tmp_path / "model")
    name = package_name("llama", model, "int4", True)
    assert name == package_name("llama", model, "int4", True)
    assert name != package_name("llama", model, "int8", True)
    assert name != package_name("llama", model, "int4", False)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    assert name != package_name("llama", model, "int4", True)  # the weights written anew


AMX = at_least("avx512_core_amx")  # where int8's activations have no zero point


@pytest.mark.parametrize(
    ("dtype", "int8_layers"), [("int8", True), ("int4", False), ("float32", False)]
)
def test_inductor_picks_kernels_only_where_every_exact_kernel_agrees(
    tiny_chat_checkpoint: Path, dtype: str, int8_layers: bool
):
    model = ChatEngine.load(tiny_chat_checkpoint, "tiny-chat", dtype=dtype).model
    assert sums_exactly(model.model.layers) is (int8_layers and AMX)
    int8_head = dtype != "float32"  # int4's head is int8 too
    assert (exact_head(model) is not None) is (int8_head and AMX)


@pytest.mark.skipif(not AMX, reason="the head's product is compiled only with AMX")
def test_only_the_heads_own_product_passes_as_its_compiled_one(tiny_chat_checkpoint: Path):
    head = exact_head(ChatEngine.load(tiny_chat_checkpoint, "tiny-chat", dtype="int4").model)
    other = exact_head(ChatEngine.load(tiny_chat_checkpoint, "tiny-chat", dtype="int8").model)
    assert head is not None
    assert other is not None
    assert head_verified(head, head.cheap_product)
    with torch.no_grad():
        other.weight_scales.mul_(1.001)  # the same integers, scaled a little differently
    assert not head_verified(head, other.cheap_product)
