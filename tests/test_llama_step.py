"""The written-out Llama step (``LlamaStep``) against the model's own forward
(``DecoderOnlyStep``): the same logits to the bit, for rows at different positions in
replies of one and of several rows, on the stock model and in every packed precision
(stacked projections, ``kernels.fused``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatbot.engine import precision
from chatbot.engine.cpu import at_least
from chatbot.engine.llama_step import LlamaStep
from chatbot.engine.model_step import DecoderOnlyStep, ModelStep

PROMPTS = [[5, 9, 13, 2], [7, 3], [11, 12, 13, 14, 15, 16, 17], [4]]
COPIES = [1, 2, 1, 3]  # a reply of two rows, one of three: beams attend as one run


def logits_of(step: ModelStep, steps: int) -> list[torch.Tensor]:
    """Admit ``PROMPTS`` and feed ``steps`` tokens to every row."""
    firsts = [sum(COPIES[:i]) for i in range(len(COPIES))]
    with torch.inference_mode():
        step.admit(PROMPTS, firsts, COPIES)
        positions = torch.tensor([len(p) for p in PROMPTS]).repeat_interleave(torch.tensor(COPIES))
        tokens, out = torch.arange(len(positions)) + 20, []
        for _ in range(steps):
            out.append(step.decode(tokens, positions, COPIES))
            tokens, positions = out[-1].argmax(-1), positions + 1
    return out


@pytest.mark.parametrize("dtype", ["stock", "float32", "int8", "bfloat16", "int4"])
def test_the_llama_step_gives_the_models_own_logits(tiny_chat_checkpoint: Path, dtype: str):
    if dtype == "bfloat16" and not at_least("avx512_core"):
        pytest.skip("bfloat16 needs AVX-512")
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint).eval()
    if dtype != "stock":
        precision.apply(model, precision.resolve(dtype, torch.device("cpu")), pack_weights=True)
    assert LlamaStep.fits(model)
    written_out = logits_of(LlamaStep(model, 64, model.dtype), steps=6)
    own_forward = logits_of(DecoderOnlyStep(model, 64, model.dtype), steps=6)
    assert all(map(torch.equal, written_out, own_forward))
