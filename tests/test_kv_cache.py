"""The reply cache holds what transformers' own cache holds, and replies do not change."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BlenderbotConfig
from transformers.cache_utils import DynamicLayer

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.families import EncoderDecoder
from chatbot.engine.kernels import Float32Linear, skip_redundant_rows
from chatbot.engine.kv_cache import ReplyCache, ReplyLayer
from chatbot.engine.plan import DecodingPlan
from chatbot.schemas import ChatRequest

TEXTS = [
    "Hello, how are you today?",
    "I like lasagne.",
    "What do you think about the weather in Provo?",
    "ok",
]


def _states(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Attention hands over transposed views, (batch, length, heads, width) underneath.
    return tuple(torch.randn(batch, length, 3, 4).transpose(1, 2) for _ in range(2))


@pytest.mark.parametrize("capacity", [9, 2])  # room for every token, and too little
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_a_reply_layer_holds_what_a_dynamic_layer_holds(capacity: int, stored: torch.dtype):
    """In bfloat16 (int8's cache), what a dynamic layer holds of the states rounded."""
    torch.manual_seed(0)
    ours, theirs = ReplyLayer(capacity, stored), DynamicLayer()
    for step, length in enumerate([1, 1, 3, 1, 1, 2]):
        states = _states(6, length)
        rounded = [s.to(stored) for s in states]
        torch.testing.assert_close(ours.update(*states), theirs.update(*rounded), rtol=0, atol=0)
        if step % 2:
            parents = torch.randint(0, 6, (6,))
            ours.reorder_cache(parents)
            theirs.reorder_cache(parents)
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert torch.equal(ours.keys, theirs.keys)
        assert torch.equal(ours.values, theirs.values)
    ours.crop(-3)
    theirs.crop(-3)
    assert torch.equal(ours.keys, theirs.keys)
    assert ours.get_seq_length() == 6


def test_beam_search_never_moves_the_cross_attention_half():
    config = BlenderbotConfig(encoder_layers=1, decoder_layers=1, d_model=12)
    cache = ReplyCache(config.get_text_config(decoder=True), 4, torch.float32)
    cache.self_attention_cache.update(*_states(4, 1), 0)
    cache.cross_attention_cache.update(*_states(4, 5), 0)
    keys = cache.cross_attention_cache.layers[0].keys.clone()
    before = cache.self_attention_cache.layers[0].keys.clone()
    cache.reorder_cache(torch.tensor([1, 1, 3, 2]))
    assert torch.equal(cache.cross_attention_cache.layers[0].keys, keys)
    assert torch.equal(cache.self_attention_cache.layers[0].keys, before[[1, 1, 3, 2]])


@pytest.mark.parametrize("beams", [1, 3])
def test_replies_are_the_ones_transformers_own_cache_gives(
    engine: ChatEngine, beams: int, monkeypatch: pytest.MonkeyPatch
):
    requests = [ChatRequest(messages=[{"role": "user", "content": t}]) for t in TEXTS]
    batch = [engine.encode(r).input_ids for r in requests]
    plan = DecodingPlan(12, 4, beams, False, 1.0, 1.0)
    ours = engine.generate_ids(batch, plan)
    monkeypatch.setattr(EncoderDecoder, "cache_kwargs", lambda *args: {})  # transformers' own
    assert engine.generate_ids(batch, plan) == ours


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_a_one_token_prompt_is_not_taken_for_beam_copies():
    """Beam copies are computed once, but a (batch x beams, 1) input is a decoder
    step whose rows differ: it must be computed row by row."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 5)
    step = torch.randn(6, 1, 8)  # 2 conversations x 3 beams, all different
    with torch.inference_mode(), skip_redundant_rows(torch.ones(2, 1, dtype=torch.long), copies=3):
        torch.testing.assert_close(Float32Linear(linear)(step), linear(step))
