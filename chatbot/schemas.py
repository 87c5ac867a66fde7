"""Pydantic models for every payload the service accepts or returns.

Validation lives here, not in handlers, so a bad request is refused with a precise
4xx message before it can reach the batch queue or the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_MESSAGE_CHARS = 4_000
"""Longest single message accepted; Blenderbot only ever sees 128 tokens anyway."""

MAX_TURNS = 200
"""Most messages in one conversation, history and new user message included."""

MAX_BEAMS = 16

MAX_NEW_TOKENS = 1024
"""Most new tokens one reply may ask for; a model's own limit may be lower."""

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
# Below 0.01, logits divided by the temperature overflow to inf and sampling fails
# (found by fuzzing: temperature 5e-324 was a 500).
_Temperature = Annotated[float, Field(ge=0.01, le=2.0)]


class GenerationOptions(_Strict):
    """Per-request overrides of the model's own ``generation_config``.

    ``None`` means "the model's default" (for blenderbot-400M-distill: 10 beams,
    at least 19 and at most 59 new tokens, no sampling).
    """

    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    num_beams: int | None = Field(default=None, ge=1, le=MAX_BEAMS)
    do_sample: bool | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None

    @model_validator(mode="after")
    def _sampling_options_need_sampling(self) -> GenerationOptions:
        uses_sampling_knobs = self.temperature is not None or self.top_p is not None
        if self.do_sample is False and uses_sampling_knobs:
            raise ValueError("temperature and top_p only apply when do_sample is true")
        return self


class ChatRequest(GenerationOptions):
    """A conversation that ends with the user's newest message, plus options."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_TURNS)

    @model_validator(mode="after")
    def _ends_with_user(self) -> ChatRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must come from the user")
        return self


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
        description="stop: the model ended its reply; length: max_new_tokens cut it.",
    )


class ModelInfo(BaseModel):
    """What a client needs to offer valid options: the model and its limits."""

    model: str
    family: str = Field(description="How the model reads a conversation.")
    note: str | None = Field(
        default=None, description="What a person should know about this model."
    )
    device: str = Field(description="Where the model runs: cpu or cuda.")
    dtype: str = Field(description="Precision of the model's weights, e.g. float32.")
    max_new_tokens_limit: int = Field(description="Most new tokens one reply can have.")
    max_beams: int = MAX_BEAMS
    default_max_new_tokens: int
    default_num_beams: int
    default_do_sample: bool
