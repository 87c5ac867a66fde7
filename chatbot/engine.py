"""Batched Blenderbot generation: many conversations, one padded ``generate`` call.

The engine is what the BentoML batch API calls with everything the adaptive batcher
collected. Requests whose decoding options differ cannot share a ``generate`` call,
so the batch is split into groups of identical options first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from chatbot.conversation import EncodedConversation, encode_conversation
from chatbot.packed_linear import pack_linear_layers, skip_padding
from chatbot.schemas import ChatReply, ChatRequest, GenerationOptions, ModelInfo


@dataclass(frozen=True)
class DecodingPlan:
    """Fully resolved decoding options; equal plans can share one ``generate`` call."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float
    top_p: float


def _options_error(field: str, value: object, message: str) -> ValidationError:
    """A validation error shaped like pydantic's own, so the API answers it as 400."""
    detail = InitErrorDetails(
        type=PydanticCustomError("model_limit", message),
        loc=(field,),
        input=value,
    )
    return ValidationError.from_exception_data("GenerationOptions", [detail])


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ChatEngine:
    """A loaded Blenderbot model and tokenizer, ready to answer batches."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.window = min(
            tokenizer.model_max_length, model.config.max_position_embeddings
        )
        # The decoder's first position holds the start token.
        self.max_new_tokens_limit = model.config.max_position_embeddings - 1
        self.defaults = self._model_defaults(model.generation_config)

    @classmethod
    def load(
        cls, path: str | Path, model_name: str, pack_weights: bool = True
    ) -> ChatEngine:
        """Load a standard Hugging Face Blenderbot checkpoint directory.

        ``pack_weights`` puts a CPU model's linear layers on oneDNN's pre-packed
        path (see ``chatbot.packed_linear``); it does nothing on a GPU.
        """
        tokenizer = AutoTokenizer.from_pretrained(
            path, truncation_side="left", padding_side="right"
        )
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32)
        model = model.to(pick_device()).eval()
        if pack_weights:
            pack_linear_layers(model)
        return cls(model, tokenizer, model_name)

    def _model_defaults(self, config: GenerationConfig) -> DecodingPlan:
        """The model's own generation_config, in new-token terms.

        An encoder-decoder's ``max_length``/``min_length`` count the decoder start
        token, so 60/20 mean 59/19 new tokens.
        """
        max_new = config.max_new_tokens or (config.max_length or 20) - 1
        min_new = config.min_new_tokens or max(0, (config.min_length or 0) - 1)
        return DecodingPlan(
            max_new_tokens=min(max_new, self.max_new_tokens_limit),
            min_new_tokens=min(min_new, max_new),
            num_beams=config.num_beams or 1,
            do_sample=bool(config.do_sample),
            temperature=config.temperature or 1.0,
            top_p=config.top_p or 1.0,
        )

    def info(self) -> ModelInfo:
        return ModelInfo(
            model=self.model_name,
            max_new_tokens_limit=self.max_new_tokens_limit,
            default_max_new_tokens=self.defaults.max_new_tokens,
            default_num_beams=self.defaults.num_beams,
            default_do_sample=self.defaults.do_sample,
        )

    def check(self, options: GenerationOptions) -> None:
        """Refuse options this model cannot honour, with a pydantic ValidationError."""
        limit = self.max_new_tokens_limit
        if options.max_new_tokens is not None and options.max_new_tokens > limit:
            raise _options_error(
                "max_new_tokens",
                options.max_new_tokens,
                f"this model can write at most {limit} tokens (its decoder has "
                f"{limit + 1} positions, one of them for the start token)",
            )

    def plan(self, options: GenerationOptions) -> DecodingPlan:
        """Resolve request options against the model's defaults.

        Never exceeds the decoder's positions: callers that skipped ``check`` (the raw
        batch API) get the longest reply the model can give.
        """
        d = self.defaults
        max_new = min(
            options.max_new_tokens or d.max_new_tokens, self.max_new_tokens_limit
        )
        sampling_knobs = options.temperature is not None or options.top_p is not None
        do_sample = (
            options.do_sample
            if options.do_sample is not None
            else d.do_sample or sampling_knobs
        )
        return DecodingPlan(
            max_new_tokens=max_new,
            min_new_tokens=min(d.min_new_tokens, max_new),
            num_beams=options.num_beams or d.num_beams,
            do_sample=do_sample,
            # Greedy and beam search ignore these: fix them so such plans group.
            temperature=(options.temperature or d.temperature) if do_sample else 1.0,
            top_p=(options.top_p or d.top_p) if do_sample else 1.0,
        )

    def encode(self, request: ChatRequest) -> EncodedConversation:
        return encode_conversation(self.tokenizer, request.messages, self.window)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        """Answer every request; one ``generate`` call per distinct decoding plan."""
        encoded = [self.encode(r) for r in requests]
        groups: dict[DecodingPlan, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[self.plan(request)].append(index)
        replies: list[ChatReply | None] = [None] * len(requests)
        for plan, indices in groups.items():
            outputs = self.generate_ids([encoded[i].input_ids for i in indices], plan)
            for i, output in zip(indices, outputs):
                replies[i] = ChatReply(
                    reply=self.tokenizer.decode(output, skip_special_tokens=True).strip(),
                    model=self.model_name,
                    prompt_tokens=len(encoded[i].input_ids),
                    completion_tokens=len(output),
                    truncated=encoded[i].truncated,
                )
        return [r for r in replies if r is not None]

    def generate_ids(
        self, batch: Sequence[Sequence[int]], plan: DecodingPlan
    ) -> list[list[int]]:
        """New token ids for each input (end-of-sequence included, padding not).

        Inputs are padded on the right: Blenderbot's learned positions must start at
        0 for every conversation, so a batched reply equals the one computed alone.
        """
        inputs = self.tokenizer.pad(
            {"input_ids": [list(ids) for ids in batch]},
            padding=True,
            return_tensors="pt",
        ).to(self.model.device)
        copies = plan.num_beams  # generate expands each conversation into its beams
        with torch.inference_mode(), skip_padding(inputs["attention_mask"], copies):
            sequences = self.model.generate(**inputs, **self._generation_kwargs(plan))
        return [self._strip(row) for row in sequences[:, 1:].tolist()]

    def _generation_kwargs(self, plan: DecodingPlan) -> dict[str, object]:
        """``generate`` overrides that replace the model's defaults without conflict.

        transformers fills anything left unset from the model's generation_config, so
        lengths are given in the decoder-length terms Blenderbot's config uses (start
        token included), the new-token fields are cleared, and the beam-only length
        penalty is reset for greedy plans.
        """
        return {
            "max_length": plan.max_new_tokens + 1,
            "min_length": plan.min_new_tokens + 1,
            "max_new_tokens": None,
            "min_new_tokens": None,
            "num_beams": plan.num_beams,
            "do_sample": plan.do_sample,
            "temperature": plan.temperature,
            "top_p": plan.top_p,
            **({"length_penalty": 1.0} if plan.num_beams == 1 else {}),
        }

    def _strip(self, row: list[int]) -> list[int]:
        """Cut the padding that follows a finished sequence's end token."""
        eos = self.tokenizer.eos_token_id
        return row[: row.index(eos) + 1] if eos in row else row
