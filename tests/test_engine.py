"""Batched generation on the tiny offline model: defaults, limits, batch == alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.plan import DecodingPlan
from chatbot.schemas import ChatRequest

PROMPTS = [
    "Hello, how are you today?",
    "I like lasagne.",
    "What do you think about the weather in Provo?",
    "My dog is called Rex </s> and he likes <mask> bones.",
    "ok",
    "Tell me something about yourself, I have a long evening ahead of me and want to talk.",
]


def request(text: str, **options) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **options)


def test_defaults_come_from_the_models_generation_config(engine: ChatEngine):
    # blenderbot-400M-distill: num_beams 10, min_length 20, max_length 60 (decoder
    # lengths, start token included).
    assert engine.defaults == DecodingPlan(
        max_new_tokens=59, min_new_tokens=19, num_beams=10,
        do_sample=False, temperature=1.0, top_p=1.0, top_k=None,
    )  # fmt: skip
    assert engine.plan(request("hi")) == engine.defaults


def test_default_reply_respects_min_and_max_length(engine: ChatEngine):
    (reply,) = engine.generate([request("hi")])
    assert 19 <= reply.completion_tokens <= 59
    assert reply.model == "tiny-blenderbot"
    assert reply.prompt_tokens == len(engine.encode(request("hi")).input_ids)


def test_options_override_defaults_within_the_decoder_window(engine: ChatEngine):
    plan = engine.plan(request("hi", max_new_tokens=5, num_beams=2))
    assert (plan.max_new_tokens, plan.min_new_tokens, plan.num_beams) == (5, 5, 2)
    (reply,) = engine.generate([request("hi", max_new_tokens=5, num_beams=2)])
    assert reply.completion_tokens <= 5
    assert engine.plan(request("hi", max_new_tokens=127)).max_new_tokens == 127


def test_past_the_decoder_positions_is_refused_with_a_message(engine: ChatEngine):
    with pytest.raises(ValidationError, match="at most 127 tokens"):
        engine.check(request("hi", max_new_tokens=128))
    # The raw batch path never goes past the decoder either.
    assert engine.plan(request("hi", max_new_tokens=1000)).max_new_tokens == 127


def test_sampling_knobs_imply_sampling_and_greedy_ignores_them(engine: ChatEngine):
    assert engine.plan(request("hi", temperature=0.7)).do_sample
    greedy = engine.plan(request("hi", num_beams=1))
    assert (greedy.temperature, greedy.top_p) == (1.0, 1.0)


@pytest.fixture(scope="module")
def int8_engine(tiny_checkpoint: Path) -> ChatEngine:
    return ChatEngine.load(tiny_checkpoint, "tiny-blenderbot", dtype="int8")


@pytest.mark.parametrize("dtype", ["auto", "int8"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_batched_reply_is_token_identical_to_the_reply_alone(
    engine, int8_engine, dtype, num_beams
):
    """Adaptive batching's padded ``generate`` call: each prompt's attention reads its
    own positions (``model_step._prompt_lengths``), and int8's integer sums make the
    rest exact, so its bfloat16 cache and rounded activations change no reply."""
    engine = engine if dtype == "auto" else int8_engine
    requests = [request(p, num_beams=num_beams, max_new_tokens=24) for p in PROMPTS]
    plan = engine.plan(requests[0])
    inputs = [engine.encode(r).input_ids for r in requests]
    assert len({len(i) for i in inputs}) > 1, "prompts must need padding"
    batched = engine.generate_ids(inputs, plan)
    alone = [engine.generate_ids([i], plan)[0] for i in inputs]
    assert batched == alone


def test_requests_with_different_options_are_answered_as_if_alone(engine):
    mixed = [
        request(PROMPTS[0], num_beams=1, max_new_tokens=10),
        request(PROMPTS[1], num_beams=3, max_new_tokens=12),
        request(PROMPTS[2], num_beams=1, max_new_tokens=10),
        request(PROMPTS[3]),
    ]
    assert engine.generate(mixed) == [engine.generate([r])[0] for r in mixed]


def test_truncation_is_reported(engine: ChatEngine):
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 10}
        for i in range(21)
    ]
    (reply,) = engine.generate([ChatRequest(messages=history, max_new_tokens=3)])
    assert reply.truncated
    assert reply.prompt_tokens == 128


def test_info_tells_clients_the_model_and_its_limits(engine: ChatEngine):
    info = engine.info()
    assert (info.model, info.max_new_tokens_limit) == ("tiny-blenderbot", 127)
    assert (info.default_max_new_tokens, info.default_num_beams) == (59, 10)
    assert info.default_do_sample is False
