"""A loaded chat model: what it accepts, and its replies by ``generate``.

The engine loads a checkpoint of either family (``chatbot.engine.families``) in the
precision asked for, checks requests against what the model can do, resolves their
options into a plan (``chatbot.engine.plan``) and readies them for the decode loop
(``prepare``). Adaptive batching calls ``generate`` with everything its batcher
collected: requests whose plans differ cannot share a ``generate`` call, so the batch
is split into groups of equal plans first. Either way, new token ids become the API's
reply in one place (``chatbot.engine.replies``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BatchEncoding,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from chatbot.engine import precision, stop_texts
from chatbot.engine.cpu import cpu_isa
from chatbot.engine.decoding import Decoding, ExtraRules, start_decoding
from chatbot.engine.families import detect_family
from chatbot.engine.kernels import attention, skip_redundant_rows
from chatbot.engine.model_step import PER_REPLY, ModelStep
from chatbot.engine.penalties import FrequencyPresencePenalty
from chatbot.engine.plan import DecodingPlan, model_defaults, options_error, resolve_plan
from chatbot.engine.replies import ReplyWriter
from chatbot.engine.streaming import ReplyStream
from chatbot.prompts.blenderbot import EncodedConversation
from chatbot.prompts.chat_template import TemplateRefused
from chatbot.schemas import ChatReply, GenerationOptions, ModelInfo, ReplyRequest, TextRequest

_NEEDS_THE_LOOP = (
    "needs the decode loop: adaptive batching decodes a batch of replies with "
    "shared random numbers and keeps no log-probabilities (CHATBOT_BATCHING=continuous)"
)


@dataclass(frozen=True)
class PreparedReply:
    """A checked request: its plan, its prompt and how its decoding starts."""

    plan: DecodingPlan
    prompt: EncodedConversation
    start_decoding: Callable[[], Decoding]


class ChatEngine:
    """A loaded chat model and tokenizer, ready to answer batches."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        note: str | None = None,
        precision_used: precision.Precision = precision.FLOAT32,
    ) -> None:
        self.model = model.eval()
        # ``generate`` attends as the decode loop's steps do (``attend_per_reply``), so
        # that a reply is the same whichever of the two writes it.
        model.set_attn_implementation(PER_REPLY)
        self.precision = precision_used
        self.family = detect_family(model.config, tokenizer)
        tokenizer.padding_side = self.family.padding_side
        if tokenizer.pad_token is None:  # most decoder-only tokenizers have none
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.note = note
        self.window, self.max_new_tokens_limit = self.family.limits(model.config, tokenizer)
        self.eos_ids = self._eos_ids(model.generation_config, tokenizer)
        config = model.generation_config
        self.defaults = model_defaults(config, self.family, self.max_new_tokens_limit)
        forces_eos = config.forced_eos_token_id is not None
        self.replies = ReplyWriter(tokenizer, model_name, self.eos_ids, forces_eos)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model_name: str,
        pack_weights: bool = True,
        note: str | None = None,
        dtype: str = "auto",
    ) -> ChatEngine:
        """Load a standard Hugging Face checkpoint directory of either family, on
        the GPU when there is one.

        ``dtype`` is a ``CHATBOT_DTYPE`` value (``chatbot.engine.precision``).
        ``pack_weights`` puts a CPU model's float32 linear layers on oneDNN's
        pre-packed path (``chatbot.engine.kernels``); it does nothing on a GPU.
        """
        tokenizer = AutoTokenizer.from_pretrained(path, truncation_side="left")
        config = AutoConfig.from_pretrained(path)
        family = detect_family(config, tokenizer)
        device = precision.pick_device()
        chosen = precision.resolve(dtype, device, precision.stored_in_four_bits(config))
        model = family.model_class.from_pretrained(path, dtype=chosen.load_dtype)
        model = model.to(device).eval()
        precision.apply(model, chosen, pack_weights)
        return cls(model, tokenizer, model_name, note, chosen)

    @staticmethod
    def _eos_ids(config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
        """Every id that ends a reply: chat models often have several (end of turn, of text)."""
        configured = config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured]
        return frozenset(i for i in [*ids, tokenizer.eos_token_id] if i is not None)

    def info(self) -> ModelInfo:
        return ModelInfo(
            model=self.model_name,
            family=self.family.name,
            note=self.note,
            device=self.model.device.type,
            dtype=self.precision.name,
            cpu_isa=cpu_isa() if self.model.device.type == "cpu" else None,
            kv_cache=str(self.cache_dtype).removeprefix("torch."),
            attention="rows" if attention.runs_on(self.model) else "sdpa",
            max_new_tokens_limit=self.max_new_tokens_limit,
            default_max_new_tokens=self.defaults.max_new_tokens,
            default_num_beams=self.defaults.num_beams,
            default_do_sample=self.defaults.do_sample,
            default_temperature=self.defaults.temperature,
            default_top_p=self.defaults.top_p,
        )

    def check(self, request: ReplyRequest) -> EncodedConversation:
        """Refuse what this model cannot honour, with a pydantic ValidationError;
        otherwise the prompt the model would read."""
        limit = self.max_new_tokens_limit
        if request.max_new_tokens is not None and request.max_new_tokens > limit:
            raise options_error(
                "max_new_tokens",
                request.max_new_tokens,
                f"this model can write at most {limit} tokens per reply",
            )
        return self.encode(request)  # a chat template may refuse the conversation

    def plan(self, options: GenerationOptions) -> DecodingPlan:
        """``options`` resolved against this model (``chatbot.engine.plan``)."""
        return resolve_plan(options, self.defaults, self.max_new_tokens_limit)

    def encode(self, request: ReplyRequest) -> EncodedConversation:
        if isinstance(request, TextRequest):
            return self.family.encode_text(self.tokenizer, request.prompt, self.window)
        try:
            return self.family.encode(self.tokenizer, request.messages, self.window)
        except TemplateRefused as refused:
            raise options_error("messages", "(conversation)", str(refused)) from None

    def check_batchable(self, request: ReplyRequest) -> EncodedConversation:
        """``check``, and refuse what a shared ``generate`` call cannot do per request
        (adaptive batching): its own random numbers, log-probabilities."""
        plan = self.plan(request)
        if plan.seed is not None:
            raise options_error("seed", plan.seed, _NEEDS_THE_LOOP)
        if plan.top_logprobs is not None:
            raise options_error("logprobs", True, _NEEDS_THE_LOOP)
        return self.check(request)

    def generate(self, requests: Sequence[ReplyRequest]) -> list[ChatReply]:
        """Answer every request; one ``generate`` call per distinct decoding plan."""
        encoded = [self.encode(r) for r in requests]
        groups: dict[DecodingPlan, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[self.plan(request)].append(index)
        replies: list[ChatReply | None] = [None] * len(requests)
        for plan, indices in groups.items():
            outputs = self.generate_ids([encoded[i].input_ids for i in indices], plan)
            for i, output in zip(indices, outputs, strict=True):
                replies[i] = self.replies.chat_reply(encoded[i], output, plan)
        return [r for r in replies if r is not None]

    def model_step(self) -> ModelStep:
        """The decode loop's view of this model (``chatbot.engine.scheduler``)."""
        return self.family.model_step(
            self.model, self.window, self.max_new_tokens_limit, self.cache_dtype
        )

    @property
    def cache_dtype(self) -> torch.dtype:
        """What the key/value cache holds (``precision.Precision.cache``), in ``generate``
        and the decode loop alike, so that their replies stay the same."""
        return self.precision.cache or self.model.dtype

    def prepare(self, request: ReplyRequest) -> PreparedReply:
        """``request`` checked and ready for the decode loop."""
        plan = self.plan(request)
        prompt = self.check(request)
        if plan.top_logprobs is not None and plan.num_beams > 1:
            raise options_error(
                "logprobs", True, "log-probabilities need num_beams 1: beam search "
                "chooses whole sequences, not tokens",
            )  # fmt: skip
        options = self._decoding_kwargs(plan)
        ids = torch.tensor([prompt.input_ids], device=self.model.device)
        start = self.family.reply_start(ids, self.model.generation_config)
        extra = self._extra_rules(plan, first_new=start.shape[1])

        def start_reply() -> Decoding:
            return start_decoding(
                self.model, options, ids, start, extra, plan.seed, plan.top_logprobs
            )

        return PreparedReply(plan, prompt, start_reply)

    def generate_ids(self, batch: Sequence[Sequence[int]], plan: DecodingPlan) -> list[list[int]]:
        """New token ids for each input (end-of-sequence included, padding not).

        Blenderbot pads on the right: its learned positions must start at 0 for
        every conversation, so a batched reply equals the one computed alone.
        Decoder-only models pad on the left, so every next token is the last column.
        """
        inputs = self._padded(batch)
        first_new = self.family.first_new_column(inputs["input_ids"].shape[1])
        extra = self._extra_rules(plan, first_new)
        with torch.inference_mode(), self._skipping_redundant_rows(inputs, plan):
            sequences = self.model.generate(
                **inputs, **self._generation_kwargs(plan),
                logits_processor=extra.processors, stopping_criteria=extra.stopping,
            )  # fmt: skip
        return [self.replies.strip(row) for row in sequences[:, first_new:].tolist()]

    def check_streamable(self, request: ReplyRequest) -> None:
        """Beam search keeps every candidate open to the end, so it cannot stream:
        that is a validation error."""
        plan = self.plan(request)
        if plan.num_beams > 1:
            raise options_error(
                "num_beams", plan.num_beams,
                "beam search cannot stream: ask for num_beams 1, or for the whole reply at once",
            )  # fmt: skip

    def stream(self, request: ReplyRequest) -> ReplyStream:
        """One reply as it is written by its own ``generate`` (call inside a coroutine)."""
        self.check_streamable(request)
        plan = self.plan(request)
        encoded = self.check_batchable(request)
        inputs = self._padded([encoded.input_ids])
        kwargs = self._generation_kwargs(plan)
        extra = self._extra_rules(plan, self.family.first_new_column(len(encoded.input_ids)))

        def generate(streamer: object, cancelled: StoppingCriteria) -> None:
            with torch.inference_mode():
                self.model.generate(
                    **inputs, **kwargs, streamer=streamer, logits_processor=extra.processors,
                    stopping_criteria=StoppingCriteriaList([*extra.stopping, cancelled]),
                )  # fmt: skip

        return ReplyStream.from_generate(
            self.tokenizer, generate, encoded, self.replies.finish_reason_of(plan), plan.stops
        )

    def _extra_rules(self, plan: DecodingPlan, first_new: int) -> ExtraRules:
        """The plan's processors and criteria that are not ``generate`` options;
        ``first_new`` is where the reply starts in the rows they see."""
        extra = ExtraRules()
        if plan.frequency_penalty or plan.presence_penalty:
            extra.processors.append(
                FrequencyPresencePenalty(plan.frequency_penalty, plan.presence_penalty, first_new)
            )
        if plan.stops:
            extra.stopping.append(stop_texts.StopTexts(self.tokenizer, plan.stops, first_new))
        return extra

    def _padded(self, batch: Sequence[Sequence[int]]) -> BatchEncoding:
        return self.tokenizer.pad(
            {"input_ids": [list(ids) for ids in batch]},
            padding=True,
            return_tensors="pt",
        ).to(self.model.device)

    def _skipping_redundant_rows(
        self, inputs: BatchEncoding, plan: DecodingPlan
    ) -> AbstractContextManager[None]:
        """Packed layers skip the prompt's padding and compute each conversation's
        beam copies once (``chatbot.engine.kernels``), where the family allows it."""
        if not self.family.skips_redundant_rows:
            return nullcontext()
        # generate expands each conversation into its beams
        return skip_redundant_rows(inputs["attention_mask"], plan.num_beams)

    def _generation_kwargs(self, plan: DecodingPlan) -> dict[str, object]:
        """``generate`` arguments: the decoding options and the family's key/value cache."""
        return {
            **self._decoding_kwargs(plan),
            **self.family.cache_kwargs(self.model.config, plan.max_new_tokens, self.cache_dtype),
        }

    def _decoding_kwargs(self, plan: DecodingPlan) -> dict[str, object]:
        """Overrides that replace the model's generation defaults without conflict.

        transformers fills anything left unset from the model's generation_config;
        the family says how lengths are written, and the beam-only length penalty is
        reset for greedy plans.
        """
        lengths = self.family.length_kwargs(
            plan.max_new_tokens, plan.min_new_tokens, self.tokenizer
        )
        # Unset, transformers' own defaults hold (left alone, as before these existed).
        optional = {
            "top_k": plan.top_k, "min_p": plan.min_p,
            "repetition_penalty": plan.repetition_penalty,
        }  # fmt: skip
        return {
            **lengths,
            "num_beams": plan.num_beams,
            "do_sample": plan.do_sample,
            "temperature": plan.temperature,
            "top_p": plan.top_p,
            **{name: value for name, value in optional.items() if value is not None},
            **({"length_penalty": 1.0} if plan.num_beams == 1 else {}),
        }
