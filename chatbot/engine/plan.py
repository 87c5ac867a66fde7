"""A request's decoding options resolved against the model: the plan both batching
modes decode by.

A request leaves most options unset; the model's own generation config fills them,
within what the model can write. Resolving once, up front, gives every later step one
frozen value to read, and lets adaptive batching group requests whose plans are equal
(one ``generate`` call each).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from transformers import GenerationConfig

from chatbot.engine.families import Family
from chatbot.schemas import GenerationOptions


@dataclass(frozen=True)
class DecodingPlan:
    """Fully resolved decoding options; equal plans can share one ``generate`` call."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stops: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None
    """None: no log-probabilities; else how many alternatives each token lists."""


def options_error(field: str, value: object, message: str) -> ValidationError:
    """A validation error shaped like pydantic's own, so the API answers it as 400."""
    detail = InitErrorDetails(
        type=PydanticCustomError("model_limit", message),
        loc=(field,),
        input=value,
    )
    return ValidationError.from_exception_data("GenerationOptions", [detail])


def model_defaults(config: GenerationConfig, family: Family, limit: int) -> DecodingPlan:
    """The model's own generation_config, in new-token terms (what its length fields
    count depends on the family), within ``limit`` new tokens."""
    max_new, min_new = family.default_lengths(config)
    max_new = min(max_new, limit)
    return DecodingPlan(
        max_new_tokens=max_new,
        min_new_tokens=min(min_new, max_new),
        num_beams=config.num_beams or 1,
        do_sample=bool(config.do_sample),
        temperature=config.temperature or 1.0,
        top_p=config.top_p or 1.0,
        top_k=config.top_k,
        min_p=config.min_p,
        repetition_penalty=config.repetition_penalty,
    )


def resolve_plan(options: GenerationOptions, defaults: DecodingPlan, limit: int) -> DecodingPlan:
    """``options`` over the model's ``defaults``.

    Never exceeds ``limit``: callers that skipped the engine's ``check`` (the raw
    batch API) get the longest reply the model can give.
    """
    d = defaults
    max_new = min(options.max_new_tokens or d.max_new_tokens, limit)
    do_sample = (
        options.do_sample
        if options.do_sample is not None
        else d.do_sample or options.uses_sampling_knobs
    )
    return DecodingPlan(
        max_new_tokens=max_new,
        min_new_tokens=min(d.min_new_tokens, max_new),
        num_beams=options.num_beams or d.num_beams,
        do_sample=do_sample,
        # Greedy and beam search ignore these: fix them so such plans group.
        temperature=(options.temperature or d.temperature) if do_sample else 1.0,
        top_p=(options.top_p or d.top_p) if do_sample else 1.0,
        top_k=(options.top_k or d.top_k) if do_sample else d.top_k,
        min_p=(options.min_p or d.min_p) if do_sample else d.min_p,
        repetition_penalty=options.repetition_penalty or d.repetition_penalty,
        frequency_penalty=options.frequency_penalty or 0.0,
        presence_penalty=options.presence_penalty or 0.0,
        stops=options.stop_texts,
        seed=options.seed if do_sample else None,
        top_logprobs=(options.top_logprobs or 0) if options.logprobs else None,
    )
