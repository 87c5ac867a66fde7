"""Pydantic models for every payload the service accepts or returns.

Validation lives here, not in handlers, so a bad request is refused with a precise
4xx message before it can reach the batch queue or the model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

MAX_MESSAGE_CHARS = 4_000
"""Longest single message accepted; Blenderbot only ever sees 128 tokens anyway."""

MAX_TURNS = 200
"""Most messages in one conversation, history and new user message included."""

MAX_BEAMS = 16

MAX_NEW_TOKENS = 1024
"""Most new tokens one reply may ask for; a model's own limit may be lower."""

MAX_STOPS = 4
"""Most stop texts one request may give (OpenAI's limit)."""

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token ``top_logprobs`` may ask for (OpenAI's limit)."""

FinishReason = Literal["stop", "length"]
"""Why a reply ended: the model ended it, or the length limit did (OpenAI's names)."""

MessageText = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
UserText = Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_CHARS, pattern=r"\S")]


class _Strict(BaseModel):
    """Unknown fields and type coercion are errors: a typo must not pass silently."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Message(_Strict):
    """One chat turn. Assistant turns may be empty (a model can answer nothing).

    System turns instruct models with a chat template; Blenderbot was never trained
    on them and ignores them.
    """

    role: Literal["system", "user", "assistant"]
    content: MessageText

    @model_validator(mode="after")
    def _user_text_is_not_blank(self) -> Message:
        if self.role == "user" and not self.content.strip():
            raise ValueError("a user message must contain some non-blank text")
        return self


# (0, 1], written the OpenAPI 3.0 way: BentoML publishes an OpenAPI 3.0 spec, where
# exclusiveMinimum is a flag next to minimum; pydantic writes the JSON Schema 2020 form
# (a number), which OpenAPI tools reject.
_TopP = Annotated[
    float, Field(gt=0.0, le=1.0, json_schema_extra={"minimum": 0.0, "exclusiveMinimum": True})
]
# Below 0.01, logits divided by the temperature (or repetition_penalty) overflow to inf
# and sampling fails (found by fuzzing: temperature 5e-324 was a 500).
_Temperature = Annotated[float, Field(ge=0.01, le=2.0)]
_Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
_StopText = Annotated[str, Field(min_length=1, max_length=200)]


class GenerationOptions(_Strict):
    """Per-request overrides of the model's own ``generation_config``.

    ``None`` means "the model's default" (for blenderbot-400M-distill: 10 beams,
    at least 19 and at most 59 new tokens, no sampling). The names and meanings are
    OpenAI's where OpenAI has the option, vLLM's extras (``top_k``, ``min_p``,
    ``repetition_penalty``) otherwise, so ``/respond`` and ``/v1`` share this model.
    """

    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    num_beams: int | None = Field(default=None, ge=1, le=MAX_BEAMS)
    do_sample: bool | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    top_k: int | None = Field(
        default=None, ge=1, description="Sample from the k likeliest tokens only."
    )
    min_p: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Drop tokens less likely than min_p times the likeliest one.",
    )  # fmt: skip
    stop: list[_StopText] | None = Field(
        default=None, max_length=MAX_STOPS,
        description=f"Up to {MAX_STOPS} texts; the reply ends before the first one "
        "written, which is never sent (finish_reason stop).",
    )  # fmt: skip
    seed: int | None = Field(
        default=None, ge=-(2**63), lt=2**64,
        description="Sampling with the same seed gives the same reply, whatever "
        "else is decoded at the same time.",
    )  # fmt: skip
    frequency_penalty: _Penalty | None = Field(
        default=None, description="OpenAI's: minus penalty x times the token was written."
    )
    presence_penalty: _Penalty | None = Field(
        default=None, description="OpenAI's: minus penalty once a token was written."
    )
    repetition_penalty: float | None = Field(
        default=None, ge=0.01, le=10.0,
        description="transformers' (CTRL's): divides the scores of tokens already "
        "in the prompt or reply.",
    )  # fmt: skip
    logprobs: bool = Field(
        default=False, description="Return the log-probability of each reply token."
    )
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS,
        description="With logprobs: also the likeliest alternatives at each token.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _sampling_options_need_sampling(self) -> GenerationOptions:
        knobs = [
            name for name in ("temperature", "top_p", "top_k", "min_p")
            if getattr(self, name) is not None
        ]  # fmt: skip
        if self.do_sample is False and knobs:
            raise ValueError(f"{', '.join(knobs)} only apply when do_sample is true")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> GenerationOptions:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs true")
        return self

    @property
    def stop_texts(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def uses_sampling_knobs(self) -> bool:
        return any(
            value is not None for value in (self.temperature, self.top_p, self.top_k, self.min_p)
        )


class ChatRequest(GenerationOptions):
    """A conversation that ends with the user's newest message, plus options."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_TURNS)

    @model_validator(mode="after")
    def _ends_with_user(self) -> ChatRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must come from the user")
        return self


class TextRequest(GenerationOptions):
    """Raw text for the model to continue (``/v1/completions``): a decoder-only model
    reads it as it is, with no chat template; Blenderbot takes it as one user turn."""

    prompt: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS * 4)


ReplyRequest = ChatRequest | TextRequest
"""What the engine answers: a conversation, or raw text to continue (``/v1/completions``)."""


class LegacyChatRequest(_Strict):
    """The payload of the original microservice design, accepted unchanged."""

    past_user_inputs: list[UserText] = Field(default_factory=list, max_length=MAX_TURNS // 2)
    generated_responses: list[MessageText] = Field(default_factory=list, max_length=MAX_TURNS // 2)
    user_input: UserText

    @model_validator(mode="after")
    def _histories_pair_up(self) -> LegacyChatRequest:
        if len(self.past_user_inputs) != len(self.generated_responses):
            raise ValueError(
                "past_user_inputs and generated_responses must have the same length "
                f"(got {len(self.past_user_inputs)} and {len(self.generated_responses)})"
            )
        return self

    def to_chat_request(self) -> ChatRequest:
        messages: list[Message] = []
        for said, answered in zip(self.past_user_inputs, self.generated_responses, strict=True):
            messages += [
                Message(role="user", content=said),
                Message(role="assistant", content=answered),
            ]
        messages.append(Message(role="user", content=self.user_input))
        return ChatRequest(messages=messages)


class TopLogprob(BaseModel):
    """One candidate token, in OpenAI's shape."""

    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's UTF-8 bytes.")


class TokenLogprob(TopLogprob):
    """A reply token's log-probability under the model (before temperature or
    penalties change the scores), with the likeliest alternatives when asked."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatReply(BaseModel):
    """The model's answer and what it cost."""

    reply: str
    model: str
    prompt_tokens: int = Field(description="Tokens the model read (after truncation).")
    completion_tokens: int = Field(description="Tokens the model wrote.")
    truncated: bool = Field(
        description="True when older turns were cut to fit the model's input window."
    )
    finish_reason: FinishReason = Field(
        default="stop",
        description="stop: the model ended its reply, or a stop text did; "
        "length: max_new_tokens cut it.",
    )
    logprobs: list[TokenLogprob] | None = Field(
        default=None, description="Only with logprobs: one entry per reply token."
    )

    @model_serializer(mode="wrap")
    def _logprobs_only_when_asked(self, write: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A reply without log-probabilities has no ``logprobs`` key, rather than a
        null: the shape clients already know, and BentoML's client fails on a null
        where its schema says array."""
        data: dict[str, Any] = write(self)
        if self.logprobs is None:
            data.pop("logprobs", None)
        return data


class ModelInfo(BaseModel):
    """What a client needs to offer valid options: the model and its limits."""

    model: str
    family: str = Field(description="How the model reads a conversation.")
    note: str | None = Field(
        default=None, description="What a person should know about this model."
    )
    device: str = Field(description="Where the model runs: cpu or cuda.")
    dtype: str = Field(
        description="The precision the model computes in (CHATBOT_DTYPE): float32, "
        "bfloat16, int8 or float16."
    )
    cpu_isa: str | None = Field(
        default=None,
        description="On a CPU, the instruction set its kernels use, as oneDNN names it "
        "(avx2, avx512_core_vnni, avx512_core_amx...).",
    )
    kv_cache: str = Field(
        default="float32",
        description="What the key/value cache holds: the model's dtype, or bfloat16 for "
        "int8 (half the bytes a step of many conversations reads).",
    )
    attention: Literal["rows", "sdpa"] = Field(
        default="sdpa",
        description="How a decode step attends: rows (one call of the engine's own "
        "kernel for every conversation, on a CPU with a C compiler) or sdpa (torch's, "
        "once per conversation; CHATBOT_ATTENTION=sdpa).",
    )
    decode_step: Literal["eager", "compiling", "compiled"] = Field(
        default="eager",
        description="How the decode loop runs its steps: compiled ahead of time "
        "(CHATBOT_COMPILE_STEP: Blenderbot and Llama-family models on CPU), being "
        "compiled in the background (the first start on a machine: a minute or a few) "
        "or eager.",
    )
    max_new_tokens_limit: int = Field(description="Most new tokens one reply can have.")
    max_beams: int = MAX_BEAMS
    default_max_new_tokens: int
    default_num_beams: int
    default_do_sample: bool
    default_temperature: float = Field(description="Used when sampling.")
    default_top_p: float = Field(description="Used when sampling.")
