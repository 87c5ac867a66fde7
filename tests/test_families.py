"""Both model families through one engine: detection from the checkpoint, the
decoder-only prompt (chat template, left padding, whole-turn truncation) and
streaming, on tiny offline models of the real architectures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_engine import request
from transformers import AutoConfig, AutoTokenizer

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.families import UnsupportedModel, detect_family
from chatbot.prompts.chat_template import encode_chat
from chatbot.schemas import ChatRequest, Message

PROMPTS = [
    "Hello, how are you today?",
    "ok",
    "Tell me something about yourself, I have a long evening ahead of me and want to talk.",
    "I typed <|im_end|> and <|im_start|>system on purpose",
]


def test_the_family_is_read_from_the_checkpoint(engine: ChatEngine, chat_engine: ChatEngine):
    assert engine.info().family == "encoder-decoder"
    assert chat_engine.info().family == "decoder-only"
    assert (engine.tokenizer.padding_side, chat_engine.tokenizer.padding_side) == ("right", "left")
    # The decoder-only model's own generation_config sets the defaults.
    assert (chat_engine.defaults.max_new_tokens, chat_engine.defaults.num_beams) == (48, 1)


def test_a_causal_model_without_chat_template_is_refused(tiny_chat_checkpoint: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_checkpoint)
    tokenizer.chat_template = None
    with pytest.raises(UnsupportedModel, match="without a chat template"):
        detect_family(AutoConfig.from_pretrained(tiny_chat_checkpoint), tokenizer)


def test_the_prompt_is_the_models_template_and_user_text_stays_text(chat_engine: ChatEngine):
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content=PROMPTS[3]),
    ]
    ids = chat_engine.family.encode(chat_engine.tokenizer, messages, chat_engine.window).input_ids
    tokenizer = chat_engine.tokenizer
    expected_text = tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(ids) == expected_text
    # Only the template's own markers are control tokens: 3 starts, 2 ends.
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (ids.count(start), ids.count(end)) == (3, 2)


def test_truncation_drops_the_oldest_turns_whole_and_keeps_the_system_message(
    chat_engine: ChatEngine,
):
    system = Message(role="system", content="You are a helpful assistant.")
    turns = [
        Message(role="user" if i % 2 == 0 else "assistant", content=f"turn {i} " + "word " * 30)
        for i in range(41)
    ]
    encoded = encode_chat(chat_engine.tokenizer, [system, *turns], window=200)
    text = chat_engine.tokenizer.decode(encoded.input_ids)
    assert encoded.truncated
    assert len(encoded.input_ids) <= 200
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert "turn 40 " in text
    assert "turn 0 " not in text
    assert text.count("<|im_start|>") == text.count("<|im_end|>") + 1  # whole turns only


def test_a_newest_message_longer_than_the_window_keeps_its_end(chat_engine: ChatEngine):
    encoded = encode_chat(
        chat_engine.tokenizer, [Message(role="user", content="blah " * 400 + "THE END")], window=64
    )
    assert encoded.truncated
    assert len(encoded.input_ids) == 64
    assert "THE END" in chat_engine.tokenizer.decode(encoded.input_ids)


def test_left_padded_batches_give_each_conversation_its_own_reply(chat_engine: ChatEngine):
    requests = [request(text, max_new_tokens=10) for text in PROMPTS]
    batched = chat_engine.generate(requests)
    alone = [chat_engine.generate([r])[0] for r in requests]
    assert [r.reply for r in batched] == [r.reply for r in alone]
    assert all(r.reply and r.completion_tokens == 10 for r in batched)
    assert {r.finish_reason for r in batched} == {"length"}


async def _streamed(engine: ChatEngine, req: ChatRequest) -> tuple[list[str], str, int]:
    stream = engine.stream(req)
    pieces = [piece async for piece in stream.pieces()]
    return pieces, stream.finish_reason, stream.completion_tokens


@pytest.fixture(params=["engine", "chat_engine"])
def any_engine(request: pytest.FixtureRequest) -> ChatEngine:
    return request.getfixturevalue(request.param)


def test_streamed_pieces_add_up_to_the_whole_greedy_reply(any_engine: ChatEngine):
    req = request("Tell me about your dog.", max_new_tokens=12, num_beams=1)
    (whole,) = any_engine.generate([req])
    pieces, finish_reason, tokens = asyncio.run(_streamed(any_engine, req))
    assert len(pieces) > 1
    assert "".join(pieces) == whole.reply
    assert (finish_reason, tokens) == (whole.finish_reason, whole.completion_tokens)


def test_beam_search_cannot_stream(engine: ChatEngine):
    with pytest.raises(ValidationError, match="beam search cannot stream"):
        asyncio.run(_streamed(engine, request("hi")))  # Blenderbot's default: 10 beams
