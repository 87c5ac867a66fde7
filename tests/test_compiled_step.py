"""What decides whether a compiled one-row step may serve (``compiled_step.verified``):
the eager layers' outputs and key/value writes, bit for bit. The layers of the same
model pass; the layers of a model whose weights differ in one norm do not. (Building,
caching and serving a package on the real offline model, and its replies against the
eager step's, are ``make run``'s test: tests/test_offline_model.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.compiled_step import OneRowLayers, package_name, verified
from chatbot.engine.llama_step import LlamaLayers, LlamaStep


def test_only_layers_that_give_the_eager_values_pass(tiny_chat_checkpoint: Path):
    engine = ChatEngine.load(tiny_chat_checkpoint, "tiny-chat", dtype="int4")
    step = engine.model_step()
    assert isinstance(step, LlamaStep)
    assert verified(step, OneRowLayers(step.model, LlamaLayers(step.model)))

    other = ChatEngine.load(tiny_chat_checkpoint, "tiny-chat", dtype="int4").model
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    assert not verified(step, OneRowLayers(other, LlamaLayers(other)))


def test_a_package_is_named_by_all_it_depends_on(tiny_chat_checkpoint: Path, tmp_path: Path):
    model = shutil.copytree(tiny_chat_checkpoint, tmp_path / "model")
    name = package_name(model, "int4", True)
    assert name == package_name(model, "int4", True)
    assert name != package_name(model, "int8", True)
    assert name != package_name(model, "int4", False)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    assert name != package_name(model, "int4", True)  # the weights written anew
