"""What decides whether a compiled step may serve, for one row or a batch
(``compiled_step.verified``, ``batch_verified``): the eager layers' outputs and
key/value writes, bit for bit. The layers of the same
model pass; the layers of a model whose weights differ in one norm do not. (Building,
caching and serving a package on the real offline model, and its replies against the
eager step's, are ``make run``'s test: tests/test_offline_model.py.) Inductor picks its
own kernels only for products that every exact kernel computes alike: int8 layers and
int4's and int8's head, where AMX takes int8 activations without a zero point."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from test_engine import PROMPTS, request
from transformers import PreTrainedModel

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.compiled_step import (
    attach,
    batch_package,
    batch_verified,
    batches,
    exact_head,
    head_package,
    head_verified,
    package_name,
    prune,
    sums_exactly,
    verified,
)
from chatbot.engine.continuous import ContinuousBatcher
from chatbot.engine.cpu import at_least
from chatbot.engine.encoder_decoder_step import EncoderDecoderStep
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


@pytest.mark.parametrize(
    ("checkpoint", "family"),
    [("tiny_checkpoint", EncoderDecoderStep), ("tiny_chat_checkpoint", LlamaStep)],
    ids=["blenderbot", "llama"],
)
def test_only_batch_layers_that_give_the_eager_values_pass(
    request: pytest.FixtureRequest, checkpoint: str, family: type
):
    """The same for the layers of a batch (2, 9 and 33 rows: their products padded to
    a bucket by 0, 1 and 7 rows), which attend with the kernel alone."""
    path = request.getfixturevalue(checkpoint)
    step = ChatEngine.load(path, checkpoint, dtype="int8").model_step()
    assert isinstance(step, family)
    if not batches(step):
        pytest.skip("batches attend with the C kernel, which did not build here")
    assert batch_verified(step, step.batch_layers())

    other = ChatEngine.load(path, checkpoint, dtype="int8").model_step()
    with torch.no_grad():
        final_norm(other.model).mul_(1.5)
    assert not batch_verified(step, other.batch_layers())


@pytest.mark.server  # builds the package in a subprocess, as the service does
def test_compiled_blenderbot_steps_write_the_replies_of_generate_alone(
    tiny_checkpoint: Path, tmp_path: Path
):
    """The packages built, verified and attached as the service does it (nothing left
    unpacked on disk); then each
    reply runs alone (one row: the compiled layers), then all at once, greedy and in
    beams (the compiled batch), and each equals ``generate``'s. The batch runs first:
    a compiled step that leaves oneDNN a primitive of its own for a shape (as ``gelu``
    did, ``EncoderDecoderStep._by_rows``) changes the eager steps after it too."""
    engine = ChatEngine.load(tiny_checkpoint, "tiny-blenderbot", dtype="int8")
    greedy = [request(p, num_beams=1, max_new_tokens=16) for p in PROMPTS]
    beams = [request(p, num_beams=3, max_new_tokens=16) for p in PROMPTS]

    async def together_then_alone() -> list[list[ChatReply]]:
        batcher = ContinuousBatcher(engine, 16, 8)
        try:
            step = batcher.loop.step
            assert isinstance(step, EncoderDecoderStep)
            # Not niced, unlike the service's build: beside the suite's other lane a
            # niced build waited minutes for the cores.
            unpacked = set(Path(tempfile.gettempdir()).glob("aotinductor_*"))
            said = attach(step, tiny_checkpoint, "int8", True, tmp_path, niceness=0)
            assert said.startswith("one-row step compiled"), said
            # Loaded, the packages leave nothing unpacked behind (``compiled_step.load``),
            # and the replies below come from programs whose folders are gone.
            assert set(Path(tempfile.gettempdir()).glob("aotinductor_*")) <= unpacked
            assert all(path.suffix == ".pt2" for path in tmp_path.iterdir())
            assert step.one_row is not None
            assert (step.batch is not None) is batches(step), said
            together = await batcher.generate(greedy)
            in_beams = await batcher.generate(beams)
            return [together, in_beams, [await batcher.reply(r) for r in greedy]]
        finally:
            batcher.close()

    together, in_beams, alone = asyncio.run(together_then_alone())
    expected = [engine.generate([r])[0] for r in greedy]
    assert alone == expected
    assert together == expected
    assert in_beams == [engine.generate([r])[0] for r in beams]


def test_a_package_is_named_by_all_it_depends_on(tiny_chat_checkpoint: Path, tmp_path: Path):
    model = shutil.copytree(tiny_chat_checkpoint, tmp_path / "model")
    name = package_name("llama", model, "int4", True)
    assert name == package_name("llama", model, "int4", True)
    assert name != package_name("llama", model, "int8", True)
    assert name != package_name("llama", model, "int4", False)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    assert name != package_name("llama", model, "int4", True)  # the weights written anew


def test_a_cache_keeps_the_packages_used_last(tmp_path: Path):
    """Every upgrade builds new packages; ``prune`` keeps the ones used last, each with
    its head's and batch's, and leaves other files alone."""
    for age, digest in enumerate(["0123456789abcdef", "fedcba9876543210", "00000000000000aa"]):
        package = tmp_path / f"llama-one-row-{digest}.pt2"
        for file in (package, head_package(package), batch_package(package)):
            file.write_bytes(b"")
            os.utime(file, (1_000_000 - age, 1_000_000 - age))
    (tmp_path / "notes.txt").write_text("mine")
    prune(tmp_path, keep=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "llama-one-row-0123456789abcdef-batch.pt2",
        "llama-one-row-0123456789abcdef-head.pt2",
        "llama-one-row-0123456789abcdef.pt2",
        "llama-one-row-fedcba9876543210-batch.pt2",
        "llama-one-row-fedcba9876543210-head.pt2",
        "llama-one-row-fedcba9876543210.pt2",
        "notes.txt",
    ]


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
