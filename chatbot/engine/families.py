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

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from chatbot.engine.encoder_decoder_step import EncoderDecoderStep
from chatbot.engine.kv_cache import ReplyCache, RoundingCache
from chatbot.engine.llama_step import LlamaStep
from chatbot.engine.model_step import DecoderOnlyStep, ModelStep
from chatbot.prompts.blenderbot import EncodedConversation, encode_conversation
from chatbot.prompts.chat_template import encode_chat, encode_text
from chatbot.schemas import MAX_NEW_TOKENS, Message

FamilyName = Literal["encoder-decoder", "decoder-only"]

DECODER_ONLY_DEFAULT_NEW_TOKENS = 256
"""Reply length for decoder-only models whose generation_config names none
(their ``max_length`` default of 20 counts the prompt, so it cannot be used)."""


class UnsupportedModel(ValueError):
    """The checkpoint is neither family; the message says what would be needed."""


class Family(ABC):
    """What differs between the two kinds of model, so the engine never asks which
    one it holds: one subclass per kind, one instance each."""

    name: FamilyName
    padding_side: Literal["left", "right"]
    model_class: type[_BaseAutoModelClass]
    skips_redundant_rows: bool
    """Whether packed layers may skip padded prompt positions and compute beam copies
    once (``chatbot.engine.kernels``): never where they feed a decoder's key/value
    cache, which needs finite values in every position."""

    @abstractmethod
    def encode(
        self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], window: int
    ) -> EncodedConversation:
        """The conversation as model input, at most ``window`` tokens."""

    @abstractmethod
    def encode_text(
        self, tokenizer: PreTrainedTokenizerBase, text: str, window: int
    ) -> EncodedConversation:
        """Raw text for the model to continue (``/v1/completions``)."""

    @abstractmethod
    def limits(
        self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[int, int]:
        """(prompt window, most new tokens) in model tokens."""

    @abstractmethod
    def default_lengths(self, config: GenerationConfig) -> tuple[int, int]:
        """(max, min) new tokens that the model's own generation_config asks for."""

    @abstractmethod
    def length_kwargs(
        self, max_new_tokens: int, min_new_tokens: int, tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, object]:
        """``generate`` arguments for these lengths that override the model's defaults
        without conflicting with them."""

    @abstractmethod
    def first_new_column(self, prompt_length: int) -> int:
        """Where the reply starts in a row that ``generate`` returns."""

    @abstractmethod
    def cache_kwargs(
        self, config: PretrainedConfig, max_new_tokens: int, stored: torch.dtype
    ) -> dict[str, object]:
        """``generate`` arguments that choose its key/value cache, which holds ``stored``
        as the loop's slots do."""

    @abstractmethod
    def reply_start(self, prompt: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        """(1, S) the ids a reply continues: what ``generate`` starts its output with."""

    @abstractmethod
    def model_step(
        self, model: PreTrainedModel, window: int, max_new_tokens: int, stored: torch.dtype
    ) -> ModelStep:
        """The decode loop's model step for this kind of model, its keys and values
        held in ``stored``."""


class EncoderDecoder(Family):
    name = "encoder-decoder"
    padding_side = "right"  # learned positions start at 0 for every conversation
    model_class = AutoModelForSeq2SeqLM
    skips_redundant_rows = True

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], window: int
    ) -> EncodedConversation:
        return encode_conversation(tokenizer, messages, window)

    def encode_text(
        self, tokenizer: PreTrainedTokenizerBase, text: str, window: int
    ) -> EncodedConversation:
        """Blenderbot only knows conversations: the text is one user turn (built
        unchecked: a completion prompt may be longer than a chat message)."""
        turn = Message.model_construct(role="user", content=text)
        return encode_conversation(tokenizer, [turn], window)

    def limits(
        self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[int, int]:
        """Prompt and reply live in separate position spaces; the decoder's first
        position holds the start token."""
        positions = config.max_position_embeddings
        return min(tokenizer.model_max_length, positions), positions - 1

    def default_lengths(self, config: GenerationConfig) -> tuple[int, int]:
        """``max_length``/``min_length`` count the decoder start token: Blenderbot's
        60/20 mean 59/19 new tokens."""
        max_new = config.max_new_tokens or (config.max_length or 20) - 1
        min_new = config.min_new_tokens or max(0, (config.min_length or 0) - 1)
        return max_new, min_new

    def length_kwargs(
        self, max_new_tokens: int, min_new_tokens: int, tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, object]:
        """Blenderbot's config gives lengths in decoder-length terms, so those are
        set and the new-token fields cleared."""
        return {
            "max_length": max_new_tokens + 1,
            "min_length": min_new_tokens + 1,
            "max_new_tokens": None,
            "min_new_tokens": None,
        }

    def first_new_column(self, prompt_length: int) -> int:
        return 1  # after the decoder start token; the prompt went to the encoder

    def reply_start(self, prompt: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        return prompt.new_full((1, 1), config.decoder_start_token_id)

    def model_step(
        self, model: PreTrainedModel, window: int, max_new_tokens: int, stored: torch.dtype
    ) -> ModelStep:
        return EncoderDecoderStep(model, stored)

    def cache_kwargs(
        self, config: PretrainedConfig, max_new_tokens: int, stored: torch.dtype
    ) -> dict[str, object]:
        """A cache with room for the reply, never copied whole (``chatbot.engine.kv_cache``);
        the decoder's positions are the start token and the reply."""
        decoder_config = config.get_text_config(decoder=True)
        return {"past_key_values": ReplyCache(decoder_config, max_new_tokens + 1, stored)}


class DecoderOnly(Family):
    name = "decoder-only"
    padding_side = "left"  # every conversation's next token sits in the last column
    model_class = AutoModelForCausalLM
    skips_redundant_rows = False

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], window: int
    ) -> EncodedConversation:
        return encode_chat(tokenizer, messages, window)

    def encode_text(
        self, tokenizer: PreTrainedTokenizerBase, text: str, window: int
    ) -> EncodedConversation:
        return encode_text(tokenizer, text, window)

    def limits(
        self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[int, int]:
        """Prompt and reply share one context: the prompt gets what the longest
        reply leaves."""
        context = min(tokenizer.model_max_length, config.max_position_embeddings)
        max_new = min(MAX_NEW_TOKENS, context // 2)
        return context - max_new, max_new

    def default_lengths(self, config: GenerationConfig) -> tuple[int, int]:
        """``max_length`` counts the prompt, so only the new-token fields mean anything."""
        return (
            config.max_new_tokens or DECODER_ONLY_DEFAULT_NEW_TOKENS,
            config.min_new_tokens or 0,
        )

    def length_kwargs(
        self, max_new_tokens: int, min_new_tokens: int, tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, object]:
        return {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
        }

    def first_new_column(self, prompt_length: int) -> int:
        return prompt_length

    def reply_start(self, prompt: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        return prompt

    def cache_kwargs(
        self, config: PretrainedConfig, max_new_tokens: int, stored: torch.dtype
    ) -> dict[str, object]:
        """transformers' own cache, its keys and values rounded to ``stored``."""
        return {"past_key_values": RoundingCache(config, stored)}

    def model_step(
        self, model: PreTrainedModel, window: int, max_new_tokens: int, stored: torch.dtype
    ) -> ModelStep:
        step = LlamaStep if LlamaStep.fits(model) else DecoderOnlyStep
        return step(model, positions=window + max_new_tokens, stored=stored)


ENCODER_DECODER: Family = EncoderDecoder()
DECODER_ONLY: Family = DecoderOnly()


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
