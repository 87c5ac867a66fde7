"""Conversation input is built exactly as transformers' removed Blenderbot code did."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import BlenderbotTokenizer, PreTrainedTokenizerBase

from chatbot.engine.chat_engine import ChatEngine
from chatbot.prompts.blenderbot import conversation_text, encode_conversation
from chatbot.schemas import Message

WINDOW = 128


def user(text: str) -> Message:
    return Message(role="user", content=text)


def bot(text: str) -> Message:
    return Message(role="assistant", content=text)


@pytest.fixture(scope="module")
def real_tokenizer(real_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return BlenderbotTokenizer.from_pretrained(
        real_tokenizer_dir, truncation_side="left", padding_side="right"
    )


def ids(tokenizer: PreTrainedTokenizerBase, *messages: Message) -> list[int]:
    return encode_conversation(tokenizer, messages, WINDOW).input_ids


def test_real_tokenizer_matches_transformers_tokenizer_tests(real_tokenizer):
    # tests/models/blenderbot/test_tokenization_blenderbot.py (3B shares this vocab)
    assert real_tokenizer("Hello world", add_special_tokens=False).input_ids == [6950, 1085]
    assert ids(real_tokenizer, user("Sam")) == [5502, 2]


def test_single_turn_matches_removed_conversational_pipeline(real_tokenizer):
    # test_integration_torch_conversation_blenderbot_400M_input_ids, test 1
    assert ids(real_tokenizer, user("hello")) == [1710, 86, 2]


def test_history_matches_removed_conversational_pipeline(real_tokenizer):
    # test_integration_torch_conversation_blenderbot_400M_input_ids, test 2
    reply = " Do you like lasagne? It is a traditional Italian dish consisting of a shepherd's pie."
    expected = [
        1710, 86,  # hello
        228, 228,  # double space
        946, 304, 398, 6881, 558, 964, 38, 452, 315, 265, 6252, 452, 322, 968,
        6884, 3146, 278, 306, 265, 617, 87, 388, 75, 341, 286, 521, 21,
        228, 228,  # double space
        281, 398, 6881, 558, 964, 21,  # I like lasagne.
        2,  # </s>
    ]  # fmt: skip
    conversation = [user("hello"), bot(reply), user("I like lasagne.")]
    assert ids(real_tokenizer, *conversation) == expected
    # A client that strips the reply's leading space gets the same model input.
    stripped = [user("hello"), bot(reply.strip()), user("I like lasagne.")]
    assert ids(real_tokenizer, *stripped) == expected


def test_text_layout():
    text = conversation_text([user("hi"), bot("Hello!"), user("how are you?")])
    assert text == " hi   Hello!   how are you?"


def test_long_history_keeps_the_newest_tokens_and_says_so(real_tokenizer):
    history = [user(f"message number {i} about my dog") for i in range(40)]
    full = [*real_tokenizer(conversation_text(history), add_special_tokens=False).input_ids, 2]
    encoded = encode_conversation(real_tokenizer, history, WINDOW)
    assert len(full) > WINDOW
    assert encoded.input_ids == full[-WINDOW:]
    assert encoded.input_ids[-1] == real_tokenizer.eos_token_id
    assert encoded.truncated
    assert not encode_conversation(real_tokenizer, history[:1], WINDOW).truncated


@pytest.mark.parametrize("text", ["</s>", "<mask>", "<pad> <s> <unk>", "a</s>b<mask>"])
def test_special_token_lookalikes_stay_text(real_tokenizer, text):
    encoded = ids(real_tokenizer, user(text))
    special = set(real_tokenizer.all_special_ids)
    assert [i for i in encoded if i in special] == [real_tokenizer.eos_token_id]
    assert max(encoded) < 8008  # <mask> lies outside the embedding matrix
    assert real_tokenizer.decode(encoded[:-1]).strip() == text


def test_tiny_tokenizer_follows_the_same_rules(engine: ChatEngine):
    tokenizer = engine.tokenizer
    encoded = ids(tokenizer, user("what is </s>?"))
    assert encoded.count(tokenizer.eos_token_id) == 1
    assert encoded[-1] == tokenizer.eos_token_id
    assert engine.window == WINDOW
