"""Turn a chat history into Blenderbot encoder input ids (the encoder-decoder family).

transformers 5 removed the ``conversational`` pipeline, so the input format it used
for Blenderbot is reproduced here: a space before each user turn, turns joined by
two spaces, ``</s>`` at the end, and only the last ``window`` tokens kept (older
turns fall off the left edge first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from chatbot.schemas import Message


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    truncated: bool
    """True when older tokens were dropped to fit the window."""
    continues_text: bool = False
    """True when the reply continues raw text (a decoder-only model's completion):
    its whitespace is kept, as the text's next characters, instead of trimmed."""


def _as_model_wrote_it(reply: str) -> str:
    """Blenderbot's own replies decode with a leading space (" Hello!").

    Clients usually strip it before showing or sending the reply back; putting it back
    makes the history read exactly as the removed pipeline, which stored the raw
    decoded reply, fed it to the model.
    """
    return reply if not reply or reply[0].isspace() else " " + reply


def conversation_text(messages: Sequence[Message]) -> str:
    """The turns as Blenderbot was trained on them; it knows no system turns."""
    turns = [
        " " + m.content if m.role == "user" else _as_model_wrote_it(m.content)
        for m in messages
        if m.role != "system"
    ]
    return "  ".join(turns)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], window: int
) -> EncodedConversation:
    """Token ids for the encoder, newest tokens kept.

    ``split_special_tokens`` keeps user text such as ``</s>`` or ``<mask>`` plain
    text: only the final end-of-sequence id is a real special token. The whole
    history is tokenized and its left end cut here, so the tokenizer's warning
    about sequences longer than the model's is off (``verbose=False``).
    """
    ids = tokenizer(
        conversation_text(messages),
        add_special_tokens=False,
        split_special_tokens=True,
        verbose=False,
    ).input_ids
    ids.append(tokenizer.eos_token_id)
    return EncodedConversation(input_ids=ids[-window:], truncated=len(ids) > window)
