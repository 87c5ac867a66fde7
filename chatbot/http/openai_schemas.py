"""OpenAI's request bodies, and how each field maps onto the service's own options.

Real clients send more than the basics: Open WebUI forwards a model's saved
parameters (``top_k``, ``num_ctx``, ``keep_alive``...), LangChain sends ``stop``,
``seed``, ``logprobs``, agent code relies on ``stop``. Each field is one of:

- honoured: mapped onto ``GenerationOptions`` (one options model for ``/respond`` and
  ``/v1``), including vLLM's extras ``top_k``, ``min_p``, ``repetition_penalty``
  and this service's ``num_beams``;
- refused with a 400 naming it, when the model cannot do what it asks (``tools``,
  JSON ``response_format``, ``suffix``, ``best_of``): ``Refused``;
- ignored: any other field, as vLLM does; ``ignored()`` names them for the log.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatbot.schemas import (
    MAX_BEAMS,
    MAX_NEW_TOKENS,
    MAX_TURNS,
    ChatRequest,
    Message,
    TextRequest,
)

MAX_CHOICES = 8
"""Most replies one request may ask for (``n``)."""
MAX_PROMPTS = 16
"""Most prompts one ``/v1/completions`` request may carry."""
MAX_LEGACY_LOGPROBS = 5
"""``/v1/completions``' ``logprobs`` is how many alternatives, at most 5 (OpenAI's)."""
_MIN_TEMPERATURE = 0.01  # the engine's floor; OpenAI's (0, 0.01) rounds up to it


class Refused(Exception):
    """A field asks for what this model or service cannot do: a 400 naming it."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


class _Lenient(BaseModel):
    """Unknown fields are kept aside (``model_extra``), not refused."""

    model_config = ConfigDict(extra="allow")

    def ignored(self, prefix: str = "") -> list[str]:
        return [f"{prefix}{name}" for name in self.model_extra or {}]


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class OpenAIMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_message(self) -> Message:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=content)


class StreamOptions(_Lenient):
    include_usage: bool = False


_Stop = Annotated[str, Field(min_length=1)]


class SamplingFields(_Lenient):
    """The fields both endpoints share."""

    model: str | None = None
    # Integers are strict: JSON's true and false are not 1 and 0 (a fuzzed seed: false).
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, strict=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: _Stop | list[_Stop] | None = None
    seed: int | None = Field(default=None, strict=True)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None  # accepted, unused: there are no per-user quotas
    # vLLM's extras; top_k -1 or 0 means "no limit", as there.
    top_k: int | None = Field(default=None, ge=-1, strict=True)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0)
    # This service's: beam search (Blenderbot's default is 10 beams).
    num_beams: int | None = Field(default=None, ge=1, le=MAX_BEAMS)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def all_ignored(self) -> list[str]:
        nested = self.stream_options.ignored("stream_options.") if self.stream_options else []
        return self.ignored() + nested

    def options(
        self, max_new_tokens: int | None, logprobs: bool, top_logprobs: int | None
    ) -> dict[str, Any]:
        """``GenerationOptions`` fields for the first choice (see ``choice_options``).

        Temperature 0 is greedy, as OpenAI means it: sampling knobs sent with it
        (Open WebUI sends its saved ``top_k`` whatever the temperature) are dropped.
        Streams and log-probabilities need one row per reply, so they default to
        greedy or sampling rather than to the model's beam search.
        """
        greedy = self.temperature == 0
        top_k = self.top_k if self.top_k and self.top_k > 0 else None
        knobs = {
            "temperature": max(self.temperature, _MIN_TEMPERATURE) if self.temperature else None,
            "top_p": self.top_p,
            "top_k": top_k,
            "min_p": self.min_p,
        }
        sampling = not greedy and any(value is not None for value in knobs.values())
        one_row = self.stream or sampling or logprobs
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "num_beams": self.num_beams or (1 if one_row else None),
            "do_sample": False if greedy else (True if sampling else None),
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logprobs": logprobs,
            "top_logprobs": top_logprobs,
            **({} if greedy else {**knobs, "seed": self.seed}),
        }
        return options

    def choice_options(self, options: dict[str, Any], index: int) -> dict[str, Any]:
        """Choice ``index`` of ``n``: its own seed (seed + index), so the n replies
        differ yet each is reproducible."""
        seed = options.get("seed")
        return {**options, "seed": None if seed is None else seed + index}


class ResponseFormat(_Lenient):
    type: str


class ChatCompletionRequest(SamplingFields):
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_TURNS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None

    def all_ignored(self) -> list[str]:
        nested = [
            name
            for i, message in enumerate(self.messages)
            for name in message.ignored(f"messages.{i}.")
        ]
        return super().all_ignored() + nested

    def requests(self) -> list[ChatRequest]:
        """One request per choice (may raise ``Refused`` or ValidationError)."""
        self._refuse_what_cannot_be_done()
        options = self.options(
            self.max_completion_tokens or self.max_tokens, self.logprobs, self.top_logprobs
        )
        messages = [m.to_message() for m in self.messages]
        return [
            ChatRequest(messages=messages, **self.choice_options(options, i)) for i in range(self.n)
        ]

    def _refuse_what_cannot_be_done(self) -> None:
        calls_tools = (self.tools or self.functions) and self.tool_choice != "none"
        if calls_tools:
            raise Refused(
                "tools",
                "this service does not call tools: its models have no tool-calling "
                "format it can parse. Send the request without tools (or with "
                "tool_choice 'none').",
            )
        if self.response_format is not None and self.response_format.type != "text":
            raise Refused(
                "response_format",
                f"'{self.response_format.type}' cannot be guaranteed: this service "
                "does not constrain decoding to JSON. Use type 'text'.",
            )


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(
        description="The text to continue, or up to 16 texts (one reply each)."
    )
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_NEW_TOKENS)  # OpenAI's default
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def requests(self) -> list[TextRequest]:
        """``n`` requests per prompt, prompt by prompt (may raise ``Refused``)."""
        self._refuse_what_cannot_be_done()
        asks = self.logprobs is not None
        options = self.options(self.max_tokens, asks, self.logprobs)
        return [
            TextRequest(prompt=prompt, **self.choice_options(options, i))
            for prompt in self.prompts
            for i in range(self.n)
        ]

    def _refuse_what_cannot_be_done(self) -> None:
        if not 1 <= len(self.prompts) <= MAX_PROMPTS:
            raise Refused("prompt", f"give 1 to {MAX_PROMPTS} prompts, not {len(self.prompts)}")
        if self.suffix:
            raise Refused("suffix", "this service's models cannot fill in the middle")
        if self.best_of not in (None, self.n):
            raise Refused("best_of", "ranking candidates is not supported; use n alone")
        if self.echo and self.logprobs is not None:
            raise Refused(
                "echo", "log-probabilities of the prompt are not computed; drop echo or logprobs"
            )
