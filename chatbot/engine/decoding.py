"""Each request's own decoding, one step at a time, exactly as ``generate`` does it.

The decode loop (``chatbot.engine.scheduler``) runs one model step for every row of
every running reply, then hands each reply its rows' logits. What happens next is the
reply's own business: its logits processors (min length, ``no_repeat_ngram_size``,
``encoder_no_repeat_ngram_size``, the forced end token, temperature, top-p...), its
token choice (greedy, sampling or a beam search step) and its stopping rule.

None of that is rewritten here. The processors, stopping criteria and beam-search
steps are transformers' own, built by the same ``GenerationMixin`` methods that
``generate`` calls, for a batch of one. That is what makes a reply from the loop
token-identical to ``generate`` on the same request alone, whatever else shares the
step. A few that only forbid ids or compare a length (minimum and maximum lengths,
end-of-text ids, a single row's n-gram rules: ``ngrams``; the forced end token before
the last position, where it changes nothing) are applied by their effect,
which gives their scores and decisions bit for bit at a fraction of the cost: one
call each per reply per step adds up at 32 replies. These methods are private to
transformers, which is why ``requirements.txt`` pins its version;
``tests/test_decode_loop.py`` compares both paths on every release.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.logits_process import (
    ForcedEOSTokenLogitsProcessor,
    LogitsProcessor,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from chatbot.engine.ngrams import RowNgrams, forbidden

GenerationModel = Any
"""A transformers model with ``GenerationMixin``; its private methods used here are
typed for the mixin's ``self``, so they are called untyped."""


@dataclass(frozen=True)
class ExtraRules:
    """A request's own logits processors and stopping criteria, beyond what its
    generation config implies: what ``generate`` takes as ``logits_processor`` and
    ``stopping_criteria`` (``generate`` places them as it does here)."""

    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    stopping: StoppingCriteriaList = field(default_factory=StoppingCriteriaList)


@dataclass(frozen=True)
class TokenChoice:
    """A chosen token's log-probability under the model's own distribution (before
    any processor), and the ``top`` likeliest (id, log-probability) pairs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class DecodingRules:
    """A request's generation config with the processors and criteria ``generate``
    would derive from it."""

    config: GenerationConfig
    processors: LogitsProcessorList
    stopping: StoppingCriteriaList

    @classmethod
    def build(
        cls,
        model: GenerationModel,
        options: dict[str, Any],
        prompt: torch.Tensor,
        start: torch.Tensor,
        extra: ExtraRules | None = None,
    ) -> DecodingRules:
        """``options`` are ``generate`` keyword arguments; ``prompt`` (1, L) the
        encoder input (or the prompt of a decoder-only model), ``start`` (1, S) the
        ids the reply continues (the decoder start token, or the prompt); ``extra``
        the processors and criteria ``generate`` would be passed."""
        extra = extra or ExtraRules()
        defaults = model.generation_config
        config, _ = model._prepare_generation_config(None, **options)
        model._prepare_special_tokens(config, True, device=prompt.device)
        config = model._prepare_generated_length(
            generation_config=config,
            has_default_max_length=options.get("max_length") is None
            and defaults.max_length is None,
            has_default_min_length=options.get("min_length") is None
            and defaults.min_length is None,
            model_input_name="input_ids",
            inputs_tensor=prompt,
            input_ids_length=start.shape[1],
        )
        processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=start.shape[1],
            encoder_input_ids=prompt,
            logits_processor=extra.processors,
            device=prompt.device,
            model_kwargs={},
        )
        stopping = model._get_stopping_criteria(config, extra.stopping)
        return cls(config, processors, stopping)

    def process(
        self, ids: RowIds, length: int, scores: torch.Tensor, row: RowNgrams | None = None
    ) -> torch.Tensor:
        """The processors in turn on the rows' ``scores`` (their ids made by ``ids``,
        ``length`` long), as ``LogitsProcessorList`` applies them, without its per-call
        signature inspection (measurable with one call per reply per step). Those that
        only forbid ids (a minimum length, and a single ``row``'s n-gram rules:
        ``banned_by``) fill them with -inf together, before the next processor that
        runs; only a processor that runs needs the ids."""
        banned: list[int] = []
        for processor in self.processors:
            forbids = banned_by(processor, length, row, scores.shape[-1])
            if forbids is None:
                scores = processor(_ids(ids()), _filled(scores, banned))
                banned = []
            else:
                banned += forbids
        return _filled(scores, banned)

    def stops(self, row: RowNgrams, ids: RowIds) -> bool:
        """Whether the stopping criteria end the one-row reply ``row`` (its ids made by
        ``ids``, for a criterion that must run); every criterion is asked, as
        ``StoppingCriteriaList`` asks them."""
        decisions = [rule(row, ids) for rule in self._stop_rules]  # each one asked
        return any(decisions)

    @cached_property
    def _stop_rules(self) -> tuple[StopRule, ...]:
        return tuple(stop_rule(criterion) for criterion in self.stopping)


RowIds = Callable[[], torch.Tensor]
"""Makes the (rows, length) ids of a reply's rows, for what must run on them."""
StopRule = Callable[[RowNgrams, RowIds], bool]


def stop_rule(criterion: StoppingCriteria) -> StopRule:
    """How ``criterion`` decides for one row: a maximum length and end-of-text ids by
    their effect alone (14 us of tensors a reply a step otherwise); any other
    criterion runs on the row's ids."""
    if type(criterion) is MaxLengthCriteria:
        limit = criterion.max_length
        return lambda row, ids: len(row.tokens) >= limit
    if type(criterion) is EosTokenCriteria:
        ends = frozenset(criterion.eos_token_id.tolist())
        return lambda row, ids: row.tokens[-1] in ends
    return lambda row, ids: bool(criterion(ids(), None)[0])


def banned_by(
    processor: LogitsProcessor, length: int, row: RowNgrams | None, vocabulary: int
) -> list[int] | None:
    """The ids ``processor`` sets to -inf, and changes nothing else, for a reply of
    ``length`` tokens (``row``: its tokens, where it is one row); None: it must run."""
    if row is not None and (repeats := forbidden(processor, row, vocabulary)) is not None:
        return repeats
    if isinstance(processor, MinimumLength):
        return processor.eos_token_id.tolist() if short_of(processor, length) else []
    if type(processor) is ForcedEOSTokenLogitsProcessor and length != processor.max_length - 1:
        return []  # it forces the end token at the last position only
    return None


def _filled(scores: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """``scores`` with the ``banned`` ids -inf (itself when there are none)."""
    if not banned:
        return scores
    return scores.index_fill(-1, torch.tensor(banned, device=scores.device), -math.inf)


MinimumLength = MinLengthLogitsProcessor | MinNewTokensLengthLogitsProcessor


def short_of(processor: MinimumLength, length: int) -> bool:
    """Whether a reply of ``length`` tokens is short of ``processor``'s minimum length.
    transformers' processor builds a mask of the
    end-of-text ids over the whole vocabulary and copies the scores at every step, to
    forbid those few ids, or to change nothing once the minimum is reached: 0.36 ms a
    token over SmolLM2's 49,152 words (3% of a served int4 token), and at 32
    Blenderbot conversations, whose replies are at least 20 tokens long, 4% of the loop.
    Filling the ids with -inf gives its scores; a minimum reached is left out.
    ``generate`` gives every decoder-only reply a minimum length, its prompt's."""
    if isinstance(processor, MinLengthLogitsProcessor):
        return length < processor.min_length
    return length - processor.prompt_length_to_skip < processor.min_new_tokens


class Decoding(ABC):
    """One reply's decoding state: ``rows`` rows of the batch, advanced a step at a time."""

    rows: int
    finished: bool = False
    choices: Sequence[TokenChoice] = ()
    """Each new token's log-probabilities, when they were asked for."""

    def __init__(self, rules: DecodingRules, start: torch.Tensor) -> None:
        self.rules = rules
        self.start_length = start.shape[1]

    @abstractmethod
    def last_tokens(self) -> list[int]:
        """The token each row feeds to the next model step."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Tokens in each row so far (start included): the next position is length - 1."""

    @abstractmethod
    def advance(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Take this step's (rows, vocab) logits; return each row's parent row (for
        the cache to follow) when rows were reordered, else None."""

    @abstractmethod
    def output(self) -> list[int]:
        """The reply's new token ids (end token included, when it ended)."""


class SingleRow(Decoding):
    """Greedy or sampled decoding: one row, whose tokens can stream as they come."""

    rows = 1

    def __init__(
        self,
        rules: DecodingRules,
        start: torch.Tensor,
        generator: torch.Generator | None = None,
        top_logprobs: int | None = None,
    ) -> None:
        """``generator``: the request's own random numbers (its seed); ``top_logprobs``:
        note each token's log-probability and that many alternatives (None: don't)."""
        super().__init__(rules, start)
        self.device = start.device
        self.row = RowNgrams(start[0].tolist())
        self.generator = generator
        self.top_logprobs = top_logprobs
        self.choices: list[TokenChoice] = []

    def last_tokens(self) -> list[int]:
        return self.row.tokens[-1:]

    @property
    def length(self) -> int:
        return len(self.row.tokens)

    def ids(self) -> torch.Tensor:
        """(1, length) the reply so far, for the processors and criteria that run on
        ids (most apply by their effect on ``row`` alone)."""
        return torch.tensor([self.row.tokens], device=self.device)

    def advance(self, logits: torch.Tensor) -> None:
        scores = self.rules.process(self.ids, self.length, logits.to(torch.float32), self.row)
        if self.rules.config.do_sample:
            probs = nn.functional.softmax(scores, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=self.generator)
        else:
            token = torch.argmax(scores, dim=-1, keepdim=True)
        chosen = int(token)
        if self.top_logprobs is not None:
            self.choices.append(_choice(logits, chosen, self.top_logprobs))
        self.row.append(chosen)
        self.finished = self.rules.stops(self.row, self.ids)
        return None

    def output(self) -> list[int]:
        return self.row.tokens[self.start_length :]


class BeamGroup(Decoding):
    """Beam search over ``num_beams`` rows, step by step, with ``generate``'s own
    beam-search steps (``GenerationMixin._beam_search``) on a batch of one."""

    def __init__(self, model: GenerationModel, rules: DecodingRules, start: torch.Tensor) -> None:
        super().__init__(rules, start)
        config = rules.config
        self.model = model
        self.rows = beams = config.num_beams
        eos = config._eos_token_tensor
        self.keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * beams
        self.top_beams = torch.arange(self.keep, device=start.device) < beams
        self.cur_len = prompt_len = start.shape[1]
        pad = config._pad_token_tensor
        fill = int(pad) if pad is not None else (int(eos[0]) if eos is not None else -1)
        running = torch.full((1, beams, config.max_length), fill, device=start.device)
        running[:, :, :prompt_len] = start
        self.running = running
        self.sequences = running.clone()
        self.running_scores = torch.zeros((1, beams), device=start.device)
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((1, beams), -1e9, device=start.device)
        self.done = torch.zeros((1, beams), dtype=torch.bool, device=start.device)
        self.may_improve = torch.ones((1, 1), dtype=torch.bool, device=start.device)
        width = config.max_length - prompt_len
        self.running_indices = torch.full(
            (1, beams, width), -1, dtype=torch.int32, device=start.device
        )
        self.indices = self.running_indices.clone()

    def last_tokens(self) -> list[int]:
        return self.running[0, :, self.cur_len - 1].tolist()

    @property
    def length(self) -> int:
        return self.cur_len

    def advance(self, logits: torch.Tensor) -> torch.Tensor:
        model, config, beams = self.model, self.rules.config, self.rows
        flat = self.running[0, :, : self.cur_len]
        log_probs = nn.functional.log_softmax(logits.to(torch.float32), dim=-1)
        log_probs = self.rules.process(lambda: flat, self.cur_len, log_probs)
        log_probs = (log_probs[None] + self.running_scores[:, :, None]).reshape(1, -1)
        top_log_probs, top_sequences, top_indices = model._get_top_k_continuations(
            accumulated_log_probs=log_probs,
            running_sequences=self.running,
            running_beam_indices=self.running_indices,
            cur_len=self.cur_len,
            decoder_prompt_len=self.start_length,
            do_sample=config.do_sample,
            beams_to_keep=self.keep,
            num_beams=beams,
            batch_size=1,
        )
        hits = self.rules.stopping(top_sequences[0, :, : self.cur_len + 1], None)[None]
        self.running, self.running_scores, self.running_indices = (
            model._get_running_beams_for_next_iteration(
                topk_log_probs=top_log_probs,
                topk_running_sequences=top_sequences,
                topk_running_beam_indices=top_indices,
                next_token_hits_stopping_criteria=hits,
                num_beams=beams,
            )
        )
        self.sequences, self.scores, self.indices, self.done = model._update_finished_beams(
            sequences=self.sequences,
            topk_running_sequences=top_sequences,
            beam_scores=self.scores,
            topk_log_probs=top_log_probs,
            beam_indices=self.indices,
            topk_running_beam_indices=top_indices,
            is_early_stop_heuristic_unsatisfied=self.may_improve,
            is_sent_finished=self.done,
            next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=self.top_beams,
            num_beams=beams,
            cur_len=self.cur_len,
            decoder_prompt_len=self.start_length,
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
        )
        parents = self.running_indices[0, :, self.cur_len - self.start_length].long()
        self.cur_len += 1
        self.may_improve = model._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.may_improve,
            running_beam_scores=self.running_scores,
            beam_scores=self.scores,
            is_sent_finished=self.done,
            cur_len=self.cur_len,
            max_length=config.max_length,
            decoder_prompt_len=self.start_length,
            early_stopping=config.early_stopping,
            length_penalty=config.length_penalty,
        )
        self.finished = not bool(
            model._beam_search_has_unfinished_sequences(
                self.may_improve, self.done, hits, config.early_stopping
            )
        )
        return parents

    def output(self) -> list[int]:
        generated = int((self.indices[0, 0] + 1).bool().sum())
        return self.sequences[0, 0, self.start_length : self.start_length + generated].tolist()


def _choice(logits: torch.Tensor, token: int, top: int) -> TokenChoice:
    """``token``'s log-probability in (1, vocab) ``logits``, and the ``top`` likeliest."""
    log_probs = nn.functional.log_softmax(logits[0].to(torch.float32), dim=-1)
    best = torch.topk(log_probs, top) if top else None
    alternatives = (
        tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else ()
    )
    return TokenChoice(token, float(log_probs[token]), alternatives)


def _ids(tensor: torch.Tensor) -> torch.LongTensor:
    return cast(torch.LongTensor, tensor)  # torch's tensor subclasses exist in its stubs only


def start_decoding(
    model: GenerationModel,
    options: dict[str, Any],
    prompt: torch.Tensor,
    start: torch.Tensor,
    extra: ExtraRules | None = None,
    seed: int | None = None,
    top_logprobs: int | None = None,
) -> Decoding:
    """The decoding ``options`` (``generate`` keyword arguments) ask for; ``seed``
    gives a sampled reply random numbers of its own."""
    rules = DecodingRules.build(model, options, prompt, start, extra)
    if rules.config.num_beams > 1:
        return BeamGroup(model, rules, start)
    generator = None
    if seed is not None:
        generator = torch.Generator(start.device).manual_seed(seed % 2**64)
    return SingleRow(rules, start, generator, top_logprobs)
