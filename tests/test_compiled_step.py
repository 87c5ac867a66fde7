"""The one-row step compiled ahead of time (``compiled_step``) on the tiny Llama: built
once into the cache, given the eager step's logits to the bit, never attached when it
does not, and loaded from the cache by the next start. (``make run``'s test serves it
on the real offline model: tests/test_offline_model.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.compiled_step import attach, package_name
from chatbot.engine.llama_step import LlamaStep
from chatbot.engine.model_step import DecoderOnlyStep, ModelStep

pytestmark = pytest.mark.server  # builds a package in a subprocess: half a minute
DTYPE = "int4"  # the offline model's


def one_reply_logits(step: ModelStep, steps: int) -> list[torch.Tensor]:
    """Greedy logits of one reply alone: every step has one row."""
    prompt = [5, 9, 13, 2, 7]
    with torch.inference_mode():
        logits = [step.admit([prompt], [0], [1])]
        position = torch.tensor([len(prompt)])
        for _ in range(steps):
            token = logits[-1].argmax(-1)
            logits.append(step.decode(token, position, [1]))
            position = position + 1
    return logits


def test_the_compiled_step_gives_the_models_own_logits(tiny_chat_checkpoint: Path, tmp_path: Path):
    engine = ChatEngine.load(tiny_chat_checkpoint, "tiny-chat", dtype=DTYPE)
    step = engine.model_step()
    assert isinstance(step, LlamaStep)
    said = attach(step, tiny_chat_checkpoint, DTYPE, True, tmp_path)
    assert said.startswith("one-row step compiled"), said
    assert step.one_row is not None
    assert [p.name for p in tmp_path.iterdir()] == [package_name(tiny_chat_checkpoint, DTYPE, True)]
    compiled = one_reply_logits(step, steps=12)
    own_forward = one_reply_logits(DecoderOnlyStep(engine.model, positions=64), steps=12)
    assert all(map(torch.equal, compiled, own_forward))

    # The next start loads the package; with other weights it is refused.
    again = LlamaStep(engine.model, positions=step.slots.max_positions)
    assert "compiled" in attach(again, tiny_chat_checkpoint, DTYPE, True, tmp_path)
    changed = ChatEngine.load(tiny_chat_checkpoint, "tiny-chat", dtype=DTYPE).model
    with torch.no_grad():
        changed.model.norm.weight.mul_(1.5)
    other = LlamaStep(changed, positions=step.slots.max_positions)
    said = attach(other, tiny_chat_checkpoint, DTYPE, True, tmp_path)
    assert said.endswith("does not give the eager step's values: not used"), said
    assert other.one_row is None
