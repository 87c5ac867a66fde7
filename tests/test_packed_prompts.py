"""Prompts admitted side by side (``PackedPrompts``) get what ``generate`` computes for
each prompt alone, to the bit: Blenderbot's cross-attention keys and values from its
own encoder call, a Llama's keys, values and first logits from its own forward, in
every packed precision, whether the prompts share one pass or several. Stock layers
(MKL's, cuBLAS's sums depend on the row count) keep a pass per prompt, as int4 does
under AMX."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BlenderbotForConditionalGeneration,
    DynamicCache,
    PreTrainedModel,
)

from chatbot.engine import model_step, precision
from chatbot.engine.cpu import at_least
from chatbot.engine.encoder_decoder_step import EncoderDecoderStep
from chatbot.engine.model_step import DecoderOnlyStep, packed_prompts

PROMPTS = [[5, 9, 13, 2], [7, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19], [4], [21, 22, 23]]
COPIES = [1, 2, 1, 3, 1]  # beams: a prompt's rows all get its keys
FIRSTS = [sum(COPIES[:i]) for i in range(len(COPIES))]
DTYPES = ["stock", "float32", "int8", "bfloat16", "int4"]


def packed(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    if dtype == "bfloat16" and not at_least("avx512_core"):
        pytest.skip("bfloat16 needs AVX-512")
    if dtype != "stock":
        precision.apply(model, precision.resolve(dtype, torch.device("cpu")), pack_weights=True)
    return model.eval()


def packs_prompts(dtype: str) -> bool:
    """Stock layers keep a pass per prompt, and so does int4's bfloat16 prompt kernel
    under AMX, whose sums can change with the rows beside a prompt's."""
    return dtype != "stock" and not (dtype == "int4" and at_least("avx512_core_amx"))


@pytest.fixture(params=[None, 8], ids=["one pass", "passes of 8 tokens"])
def tokens_per_pass(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param is not None:
        monkeypatch.setattr(model_step, "PROMPT_TOKENS_PER_PASS", request.param)


def test_prompts_pack_in_order_one_token_prompts_alone(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(model_step, "PROMPT_TOKENS_PER_PASS", 8)
    assert packed_prompts(PROMPTS) == [[0, 1], [2], [3], [4]]  # 9 tokens alone; 1 token too
    monkeypatch.setattr(model_step, "PROMPT_TOKENS_PER_PASS", 1024)
    assert packed_prompts(PROMPTS) == [[0, 1, 2], [3], [4]]
    assert packed_prompts([[1, 2]] * 600) == [list(range(512)), list(range(512, 600))]


@pytest.mark.usefixtures("tokens_per_pass")
@pytest.mark.parametrize("dtype", DTYPES)
def test_blenderbot_prompts_side_by_side_get_their_encoder_calls_values(
    tiny_checkpoint: Path, dtype: str
):
    model = packed(BlenderbotForConditionalGeneration.from_pretrained(tiny_checkpoint), dtype)
    step = EncoderDecoderStep(model, model.dtype)
    assert step.packs_prompts == packs_prompts(dtype)
    with torch.inference_mode():
        step.reserve(sum(COPIES))
        assert step.admit(PROMPTS, FIRSTS, COPIES) is None
        for prompt, first, count in zip(PROMPTS, FIRSTS, COPIES, strict=True):
            row, length = step.prompts[first].tolist()
            assert length == len(prompt)
            assert step.prompts[first : first + count].tolist() == [[row, length]] * count
            ids = torch.tensor([prompt])
            alone = model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
            for index, layer in enumerate(step.decoder.layers):
                keys, values = step._cross_keys_values(layer, alone)
                assert torch.equal(step.cross.keys[index][row : row + 1, :, :length], keys)
                assert torch.equal(step.cross.values[index][row : row + 1, :, :length], values)


@pytest.mark.usefixtures("tokens_per_pass")
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_prompts_side_by_side_get_their_forwards_keys_and_logits(
    tiny_chat_checkpoint: Path, dtype: str
):
    model = packed(AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint), dtype)
    step = DecoderOnlyStep(model, 64, model.dtype)
    assert step.packs_prompts == packs_prompts(dtype)
    with torch.inference_mode():
        step.reserve(sum(COPIES))
        logits = step.admit(PROMPTS, FIRSTS, COPIES)
        for prompt, first, count in zip(PROMPTS, FIRSTS, COPIES, strict=True):
            cache = DynamicCache(config=model.config)
            alone = model(input_ids=torch.tensor([prompt]), past_key_values=cache, logits_to_keep=1)
            rows, length = slice(first, first + count), len(prompt)
            assert torch.equal(logits[rows], alone.logits[:, -1].expand(count, -1))
            for index, layer in enumerate(cache.layers):
                keys = step.slots.keys[index][rows, :, :length]
                values = step.slots.values[index][rows, :, :length]
                assert torch.equal(keys, layer.keys.expand_as(keys))
                assert torch.equal(values, layer.values.expand_as(values))
