"""Turn a chat history into prompt ids for a decoder-only model, with its own template.

Instruct models (SmolLM2, Qwen2.5-Instruct, ...) ship a Jinja chat template in their
tokenizer config; ``apply_chat_template`` renders it. Two things are added here:

* Message text never becomes control tokens. The template is rendered around
  placeholders, and each message's text is tokenized on its own with
  ``split_special_tokens``: a user who types ``<|im_end|>`` sends those characters,
  not the end-of-turn token.
* The prompt fits the window by dropping the oldest turns whole (system messages
  stay), so the model never sees half a turn or a template cut in two. Only when the
  newest message alone is too long is it cut, from the left, keeping its end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from chatbot.prompts.blenderbot import EncodedConversation
from chatbot.schemas import Message

# Private-use code points: no tokenizer, template or user text gives them meaning.
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


class TemplateRefused(ValueError):
    """The model's chat template rejects this conversation (its message says why)."""


def _placeholder(index: int) -> str:
    return f"\ue000{index}\ue001"


def render_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """The whole prompt, generation prompt included, with message text kept as text."""
    try:
        skeleton = tokenizer.apply_chat_template(
            [{"role": m.role, "content": _placeholder(i)} for i, m in enumerate(messages)],
            tokenize=False,
            add_generation_prompt=True,
        )
    except TemplateError as error:
        raise TemplateRefused(f"the model's chat template refused: {error}") from None
    assert isinstance(skeleton, str)  # tokenize=False: the rendered text
    ids: list[int] = []
    start = 0
    for match in _PLACEHOLDER.finditer(skeleton):
        ids += tokenizer(skeleton[start : match.start()], add_special_tokens=False).input_ids
        text = messages[int(match.group(1))].content
        ids += tokenizer(
            text, add_special_tokens=False, split_special_tokens=True, verbose=False
        ).input_ids  # a long message is cut by the caller, so no length warning
        start = match.end()
    ids += tokenizer(skeleton[start:], add_special_tokens=False).input_ids
    return ids


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], window: int
) -> EncodedConversation:
    """Prompt ids of at most ``window`` tokens, newest turns kept.

    The number of turns to keep is found by bisection (a handful of renders even for
    a 200-turn history), since templates do not tokenize turn by turn.
    """
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]

    def prompt(kept: int) -> list[int]:
        return render_ids(tokenizer, system + turns[len(turns) - kept :])

    ids = prompt(len(turns))
    if len(ids) <= window:
        return EncodedConversation(input_ids=ids, truncated=False)
    fits, too_many = 1, len(turns)  # invariant: too_many turns do not fit
    if len(prompt(1)) <= window:
        while too_many - fits > 1:
            middle = (fits + too_many) // 2
            fits, too_many = (middle, too_many) if len(prompt(middle)) <= window else (fits, middle)
    return EncodedConversation(input_ids=prompt(fits)[-window:], truncated=True)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, window: int) -> EncodedConversation:
    """Raw text as a decoder-only model continues it: no chat template, the
    tokenizer's own special tokens (a Llama's BOS), the newest ``window`` tokens."""
    ids = tokenizer(text).input_ids
    return EncodedConversation(
        input_ids=ids[-window:], truncated=len(ids) > window, continues_text=True
    )
