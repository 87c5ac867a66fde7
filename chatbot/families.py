"""The two kinds of chat model the service serves, told apart by the checkpoint itself.

* ``encoder-decoder``: the Blenderbot family (blenderbot-400M-distill, -1B-distill,
  -3B, blenderbot_small-90M). The conversation is Blenderbot's flat text format,
  128 tokens at most, padded on the right (learned positions start at 0).
* ``decoder-only``: causal language models whose tokenizer carries a chat template
  (SmolLM2, Qwen2.5-Instruct, Llama-3-Instruct...). The prompt is the template's,
  padded on the left so every conversation's next token sits in the last column.

Nobody configures the family: ``config.is_encoder_decoder`` and the tokenizer's
``chat_template`` decide, so any checkpoint of either kind just works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from chatbot.chat_template import encode_chat
from chatbot.conversation import EncodedConversation, encode_conversation
from chatbot.schemas import Message

FamilyName = Literal["encoder-decoder", "decoder-only"]

MAX_NEW_TOKENS_CAP = 1024
"""Most new tokens a decoder-only reply may have (the API's own upper bound)."""

DECODER_ONLY_DEFAULT_NEW_TOKENS = 256
"""Reply length for decoder-only models whose generation_config names none
(their ``max_length`` default of 20 counts the prompt, so it cannot be used)."""


class UnsupportedModel(ValueError):
    """The checkpoint is neither family; the message says what would be needed."""


@dataclass(frozen=True)
class Family:
    name: FamilyName
    padding_side: Literal["left", "right"]

    @property
    def model_class(self) -> type:
        return AutoModelForSeq2SeqLM if self.name == "encoder-decoder" else AutoModelForCausalLM

    def encode(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: Sequence[Message],
        window: int,
    ) -> EncodedConversation:
        if self.name == "encoder-decoder":
            return encode_conversation(tokenizer, messages, window)
        return encode_chat(tokenizer, messages, window)

    def limits(
        self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[int, int]:
        """(prompt window, most new tokens) in model tokens.

        An encoder-decoder reads and writes in separate position spaces (the decoder's
        first position holds the start token). A decoder-only model's prompt and reply
        share one context, so the prompt gets what the longest reply leaves.
        """
        positions = config.max_position_embeddings
        if self.name == "encoder-decoder":
            return min(tokenizer.model_max_length, positions), positions - 1
        context = min(tokenizer.model_max_length, positions)
        max_new = min(MAX_NEW_TOKENS_CAP, context // 2)
        return context - max_new, max_new


ENCODER_DECODER = Family("encoder-decoder", padding_side="right")
DECODER_ONLY = Family("decoder-only", padding_side="left")


def detect_family(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> Family:
    """The family of a checkpoint, from its config and tokenizer alone."""
    if config.is_encoder_decoder:
        return ENCODER_DECODER
    if tokenizer.chat_template:
        return DECODER_ONLY
    raise UnsupportedModel(
        f"this is a {config.model_type} model without a chat template: it was not "
        "tuned for chat. Use an instruct/chat checkpoint (one whose tokenizer_config "
        "has a chat_template, e.g. HuggingFaceTB/SmolLM2-360M-Instruct) or a "
        "Blenderbot model."
    )
