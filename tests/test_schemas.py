"""Payload validation: bad input is refused with a message before any model work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chatbot.schemas import MAX_MESSAGE_CHARS, MAX_TURNS, ChatRequest, LegacyChatRequest


def chat(**fields) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_legacy_payload_becomes_alternating_messages():
    request = LegacyChatRequest(
        past_user_inputs=["hello"], generated_responses=["Hi!"], user_input="How are you?"
    ).to_chat_request()
    assert [(m.role, m.content) for m in request.messages] == [
        ("user", "hello"),
        ("assistant", "Hi!"),
        ("user", "How are you?"),
    ]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"user_input": ""}, "at least 1 character"),
        ({"user_input": " \n\t"}, "pattern"),
        ({"user_input": 42}, "valid string"),
        ({}, "Field required"),
        ({"user_input": "x" * (MAX_MESSAGE_CHARS + 1)}, "at most 4000"),
        ({"user_input": "hi", "past_user_inputs": ["a"]}, "same length"),
        ({"user_input": "hi", "past_user_inputs": "a", "generated_responses": "b"}, "valid list"),
        ({"user_input": "hi", "unknown": 1}, "Extra inputs"),
        (
            {"user_input": "hi", "past_user_inputs": ["a"] * MAX_TURNS,
             "generated_responses": ["b"] * MAX_TURNS},
            "at most 100 items",
        ),
    ],
)  # fmt: skip
def test_legacy_payload_errors(payload, message):
    with pytest.raises(ValidationError, match=message):
        LegacyChatRequest(**payload)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_new_tokens": 0}, "greater than or equal to 1"),
        ({"num_beams": 17}, "less than or equal to 16"),
        ({"temperature": 0}, "greater than or equal to 0.01"),
        ({"temperature": 5e-324}, "greater than or equal to 0.01"),
        ({"top_p": 1.5}, "less than or equal to 1"),
        ({"do_sample": "yes"}, "valid boolean"),
        ({"do_sample": False, "temperature": 0.7}, "only apply when do_sample"),
    ],
)
def test_generation_option_errors(fields, message):
    with pytest.raises(ValidationError, match=message):
        chat(**fields)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "at least 1 item"),
        ([{"role": "assistant", "content": "hi"}], "last message must come from the user"),
        ([{"role": "robot", "content": "hi"}], "'system', 'user' or 'assistant'"),
        ([{"role": "system", "content": "hi"}], "last message must come from the user"),
        ([{"role": "user", "content": "  "}], "non-blank"),
        ([{"role": "user", "content": "hi"}] * (MAX_TURNS + 1), "at most 200 items"),
    ],
)
def test_message_errors(messages, message):
    with pytest.raises(ValidationError, match=message):
        ChatRequest(messages=messages)


def test_an_empty_assistant_turn_is_kept():
    """A model may answer nothing; sending that history back must still work."""
    request = ChatRequest(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "hello?"},
        ]
    )
    assert request.messages[1].content == ""
