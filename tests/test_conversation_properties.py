"""Property tests (hypothesis) of conversation building, for any unicode and lengths:
never more than the window, the newest user turn kept, look-alikes of special tokens
left as text. Run on the real Blenderbot tokenizer (when ../shared has it) and on
the tiny test model's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import BlenderbotTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from chatbot.engine.chat_engine import ChatEngine
from chatbot.prompts.blenderbot import conversation_text, encode_conversation
from chatbot.schemas import MAX_MESSAGE_CHARS, ChatRequest, Message

WINDOW = 128
# Byte-level BPE writes each byte as one printable character; this maps them back.
BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}
LOOKALIKES = ["</s>", "<s>", "<pad>", "<unk>", "<mask>", "__start__", "<|endoftext|>"]

# Any unicode (no lone surrogates: JSON bodies cannot carry them as text), with
# special-token look-alikes mixed in, from empty to the longest message allowed.
text = (
    st.lists(st.one_of(st.text(max_size=300), st.sampled_from(LOOKALIKES)), max_size=12)
    .map("".join)
    .filter(lambda t: len(t) <= MAX_MESSAGE_CHARS)
)
user_text = text.filter(lambda t: t.strip())


@st.composite
def conversations(draw: st.DrawFn) -> list[Message]:
    """Alternating-or-not turns of any length, ending with the user, as the API allows."""
    turns = draw(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), text), max_size=8))
    turns = [(role, content) for role, content in turns if role == "assistant" or content.strip()]
    turns.append(("user", draw(user_text)))
    messages = [{"role": role, "content": content} for role, content in turns]
    return ChatRequest(messages=messages).messages


@pytest.fixture(scope="module", params=["real", "tiny"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    if request.param == "tiny":
        return request.getfixturevalue("engine").tokenizer
    directory: Path = request.getfixturevalue("real_tokenizer_dir")
    return BlenderbotTokenizer.from_pretrained(directory, truncation_side="left")


PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


LONG = [
    Message(role="user", content="é" * 3000),
    Message(role="assistant", content="ok " * 500),
    Message(role="user", content="🙂</s>" * 700),
]


@PROPERTY_SETTINGS
@given(messages=conversations())
@example(messages=LONG)  # the newest turn alone overflows the window
@example(messages=[*LONG[:2], Message(role="user", content="short")])
def test_conversation_input_properties(tokenizer: PreTrainedTokenizerBase, messages):
    encoded = encode_conversation(tokenizer, messages, WINDOW)
    ids = encoded.input_ids

    # Never more than the window; exactly one special token, the final </s>.
    assert 1 <= len(ids) <= WINDOW
    assert ids[-1] == tokenizer.eos_token_id
    assert not set(ids[:-1]) & set(tokenizer.all_special_ids)

    # What is kept is the newest end of the conversation, byte for byte...
    full = _as_tokenizer_sees(tokenizer, conversation_text(messages)).encode()
    kept = _bytes_of(tokenizer, ids[:-1])
    assert full.endswith(kept)
    assert encoded.truncated == (len(kept) < len(full))

    # ...so the newest user turn is there whole, or it alone fills the window.
    newest = (" " + messages[-1].content).encode()
    assert kept.endswith(newest) or newest.endswith(kept)


def _as_tokenizer_sees(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """Blenderbot's tokenizer puts a space before text that does not start with one."""
    prefix = getattr(tokenizer, "add_prefix_space", False) and not text.startswith(" ")
    return " " + text if prefix else text


def _bytes_of(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> bytes:
    """The exact bytes byte-level BPE tokens stand for (decode() would replace a
    character cut in half at the window's edge)."""
    return bytes(BYTE_OF[c] for token in tokenizer.convert_ids_to_tokens(ids) for c in token)


@PROPERTY_SETTINGS
@given(before=text, lookalike=st.sampled_from(LOOKALIKES), after=text)
def test_special_token_lookalikes_stay_text(tokenizer, before, lookalike, after):
    messages = [Message(role="user", content=f"{before}{lookalike}{after}x")]
    ids = encode_conversation(tokenizer, messages, 10_000).input_ids
    assert ids.count(tokenizer.eos_token_id) == 1
    expected = _as_tokenizer_sees(tokenizer, conversation_text(messages))
    assert _bytes_of(tokenizer, ids[:-1]) == expected.encode()


def test_the_engine_uses_this_window(engine: ChatEngine):
    assert engine.window == WINDOW
