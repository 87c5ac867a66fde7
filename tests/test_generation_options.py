"""The options real OpenAI clients send, on the engine and the decode loop, in process:
stop texts, seeds, OpenAI's penalties, log-probabilities and raw-text prompts, on
both tiny model families."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError
from test_decode_loop import run
from test_engine import PROMPTS, request
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteria,
)

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.continuous import ContinuousBatcher
from chatbot.engine.decoding import DecodingRules, RowIds, short_of
from chatbot.engine.ngrams import RowNgrams
from chatbot.engine.penalties import FrequencyPresencePenalty
from chatbot.engine.stop_texts import StopScanner
from chatbot.schemas import ChatReply, ChatRequest, TextRequest


@pytest.fixture(params=["engine", "chat_engine"], ids=["blenderbot", "decoder-only"])
def family_engine(request: pytest.FixtureRequest) -> ChatEngine:
    return request.getfixturevalue(request.param)


def new_ids(engine: ChatEngine, chat: ChatRequest) -> list[int]:
    """The reply's new token ids, from ``generate`` alone."""
    prompt = engine.encode(chat).input_ids
    return engine.generate_ids([prompt], engine.plan(chat))[0]


def stop_across_tokens(engine: ChatEngine, ids: list[int]) -> tuple[str, int, int]:
    """A stop text made of the last two characters of one token and the first two of
    the next; where it starts in the raw text, and how many tokens complete it."""
    decode = engine.tokenizer.decode
    for i in range(1, len(ids) - 1):
        before, upto, after = (decode(ids[:k], skip_special_tokens=True) for k in (i, i + 1, i + 2))
        if len(upto) - len(before) >= 2 and len(after) - len(upto) >= 2:
            stop = after[len(upto) - 2 : len(upto) + 2]
            if after.find(stop) == len(upto) - 2:  # its first occurrence
                return stop, len(upto) - 2, i + 2
    raise AssertionError(f"no two neighbouring tokens of 2+ characters in {decode(ids)!r}")


def test_a_stop_text_across_tokens_ends_the_reply_before_it(family_engine):
    engine = family_engine
    plain = request(PROMPTS[2], num_beams=1, max_new_tokens=24)
    ids = new_ids(engine, plain)
    stop, at, tokens = stop_across_tokens(engine, ids)
    raw = engine.tokenizer.decode(ids, skip_special_tokens=True)
    stopped = request(PROMPTS[2], num_beams=1, max_new_tokens=24, stop=["never written", stop])

    async def whole_and_streamed(batcher: ContinuousBatcher) -> tuple[ChatReply, list[str]]:
        stream = batcher.stream(stopped)
        pieces = [piece async for piece in stream.pieces()]
        assert stream.finish_reason == "stop"
        return await batcher.reply(stopped), pieces

    whole, pieces = run(engine, whole_and_streamed)
    assert whole.reply == raw[:at].strip()
    assert (whole.finish_reason, whole.completion_tokens) == ("stop", tokens)
    assert "".join(pieces) == raw[:at].lstrip()  # so no character of the stop text was sent
    assert engine.generate([stopped]) == [whole]  # adaptive batching: the same reply


def test_a_held_back_tail_is_sent_once_it_cannot_be_a_stop_text():
    scanner = StopScanner(["User:"])
    assert [scanner.feed(p) for p in ["Hello. U", "s", "ually", " yes. Us", "er: hi"]] == [
        "Hello. ", "", "Usually", " yes. ", "",
    ]  # fmt: skip
    assert (scanner.end(), scanner.stopped) == ("", True)
    scanner = StopScanner(["User:"])
    assert (scanner.feed("ok U"), scanner.end()) == ("ok ", "U")


def test_a_seed_gives_the_same_sampled_reply_whatever_shares_the_steps(family_engine):
    def sampled(seed: int, prompt: str = PROMPTS[0]) -> ChatRequest:
        return request(prompt, num_beams=1, do_sample=True, max_new_tokens=16, seed=seed)

    neighbours = [sampled(seed, p) for seed, p in enumerate(PROMPTS[1:])]

    async def crowded(batcher: ContinuousBatcher) -> ChatReply:
        async def later(r: ChatRequest) -> ChatReply:
            await asyncio.sleep(0.01)
            return await batcher.reply(r)

        first, *_ = await asyncio.gather(
            batcher.reply(sampled(1234)), *map(batcher.reply, neighbours), later(neighbours[0])
        )
        return first

    alone = run(family_engine, lambda b: b.reply(sampled(1234)))
    assert run(family_engine, crowded).reply == alone.reply
    assert run(family_engine, lambda b: b.reply(sampled(99))).reply != alone.reply


def test_openai_penalties_follow_openais_formula():
    written = torch.tensor([[7, 1, 1, 2]])  # the first column is the prompt
    scores = torch.zeros(1, 4)
    penalised = FrequencyPresencePenalty(0.5, 0.25, first_new=1)(written, scores)
    # token 1 written twice, token 2 once, tokens 0 and 3 never (7 was the prompt's)
    assert penalised.tolist() == [[0.0, -1.25, -0.75, 0.0]]


@pytest.mark.parametrize(
    "options",
    [
        {"frequency_penalty": 1.5, "presence_penalty": 0.5},
        {"repetition_penalty": 1.8},
        {"do_sample": True, "top_k": 1},
    ],
    ids=["openai-penalties", "repetition-penalty", "top-k-1"],
)
def test_options_change_the_reply_as_they_should(family_engine, options):
    greedy = request(PROMPTS[1], num_beams=1, max_new_tokens=24)
    changed = request(PROMPTS[1], num_beams=1, max_new_tokens=24, **options)
    plain_ids, new = new_ids(family_engine, greedy), new_ids(family_engine, changed)
    if options.get("top_k") == 1:  # sampling from the single likeliest token is greedy
        assert new == plain_ids
    else:  # the tiny models repeat themselves; penalties make them repeat less
        assert len(set(new)) > len(set(plain_ids))
    assert run(family_engine, lambda b: b.reply(changed)) == family_engine.generate([changed])[0]


def forward_logprobs(engine: ChatEngine, prompt: list[int], ids: list[int]) -> list[float]:
    """Each of ``ids``' log-probability from one teacher-forced forward pass."""
    model = engine.model
    with torch.inference_mode():
        if model.config.is_encoder_decoder:
            start = [model.generation_config.decoder_start_token_id]
            logits = model(
                input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([start + ids[:-1]])
            ).logits[0]
        else:
            logits = model(input_ids=torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1 :]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return [float(log_probs[i, token]) for i, token in enumerate(ids)]


def test_logprobs_are_the_models_own(family_engine):
    engine = family_engine
    asked = request(PROMPTS[0], num_beams=1, max_new_tokens=12, logprobs=True, top_logprobs=3)
    reply = run(engine, lambda b: b.reply(asked))
    ids = new_ids(engine, asked)
    expected = forward_logprobs(engine, engine.encode(asked).input_ids, ids)
    textless = engine.replies.textless_ids
    shown = [(t, lp) for t, lp in zip(ids, expected, strict=True) if t not in textless]
    assert reply.logprobs is not None
    assert len(reply.logprobs) == len(shown)
    for token, (_token_id, logprob) in zip(reply.logprobs, shown, strict=True):
        assert token.logprob == pytest.approx(logprob, abs=1e-4)
        assert bytes(token.bytes).decode("utf-8", "replace") == token.token
        alternatives = [a.logprob for a in token.top_logprobs]
        # The likeliest first; Blenderbot's rules (no repeated 3-grams...) may pass them over.
        assert len(alternatives) == 3
        assert alternatives == sorted(alternatives, reverse=True)
        assert token.logprob <= alternatives[0] + 1e-6
    assert "".join(t.token for t in reply.logprobs).strip() == reply.reply


def test_what_a_shared_generate_cannot_do_is_refused_in_adaptive_mode(engine):
    for options in [{"do_sample": True, "seed": 1}, {"num_beams": 1, "logprobs": True}]:
        with pytest.raises(ValidationError, match="CHATBOT_BATCHING=continuous"):
            engine.check_batchable(request("hi", **options))
    with pytest.raises(ValidationError, match="num_beams 1"):
        engine.prepare(request("hi", num_beams=3, logprobs=True))


def test_a_decoder_only_model_continues_raw_text_as_written(chat_engine):
    text = TextRequest(prompt="The capital of France is", num_beams=1, max_new_tokens=6)
    encoded = chat_engine.encode(text)
    assert encoded.input_ids == chat_engine.tokenizer(text.prompt).input_ids  # no template
    reply = run(chat_engine, lambda b: b.reply(text))
    ids = new_ids(chat_engine, text)
    assert reply.reply == chat_engine.tokenizer.decode(ids, skip_special_tokens=True)  # unstripped


def test_blenderbot_takes_raw_text_as_one_user_turn(engine):
    text = TextRequest(prompt="Hello, how are you?", num_beams=1, max_new_tokens=8)
    chat = request("Hello, how are you?", num_beams=1, max_new_tokens=8)
    assert engine.encode(text) == engine.encode(chat)
    assert run(engine, lambda b: b.reply(text)) == engine.generate([chat])[0]


def made(ids: torch.Tensor) -> RowIds:
    """A maker of ``ids``, as a reply hands its ids to ``DecodingRules``."""
    return lambda: ids


@pytest.mark.parametrize(
    "minimum",
    [
        MinLengthLogitsProcessor(5, eos_token_id=[2, 7]),
        MinNewTokensLengthLogitsProcessor(2, 3, eos_token_id=[2, 7]),
    ],
    ids=["min_length", "min_new_tokens"],
)
def test_a_minimum_length_gives_transformers_scores_short_of_it_and_after(minimum):
    """``DecodingRules.process`` applies a minimum length by its effect alone
    (``decoding.short_of``): the scores are transformers' own, short of it and after."""
    processors = LogitsProcessorList([minimum, TemperatureLogitsWarper(0.7)])
    rules = DecodingRules(GenerationConfig(), processors, StoppingCriteriaList())
    scores = torch.randn(1, 50)
    for length in (3, 4, 5, 9):
        ids = torch.zeros(1, length, dtype=torch.long)
        assert torch.equal(rules.process(made(ids), length, scores), processors(ids, scores))
        assert short_of(minimum, length) == (length < 5)


def test_the_forced_end_token_gives_transformers_scores_at_every_length():
    """Before the last position ``ForcedEOSTokenLogitsProcessor`` changes nothing: it
    runs (on the ids, made for it) at the last position only, and the scores are
    transformers' at every length (a minimum length applied by effect before it)."""
    processors = LogitsProcessorList(
        [MinLengthLogitsProcessor(3, [2]), ForcedEOSTokenLogitsProcessor(6, [2, 5])]
    )
    rules = DecodingRules(GenerationConfig(), processors, StoppingCriteriaList())
    scores = torch.randn(1, 50)
    made_at: list[int] = []
    for length in range(1, 8):
        ids = torch.zeros(1, length, dtype=torch.long)

        def ids_made(ids: torch.Tensor = ids) -> torch.Tensor:
            made_at.append(ids.shape[1])
            return ids

        processed = rules.process(ids_made, length, scores)
        assert torch.equal(processed, processors(ids, scores)), length
    assert set(made_at) == {5}


@pytest.mark.parametrize("size", [1, 2, 3])
def test_the_ngram_rules_of_one_row_give_transformers_scores_at_every_length(size: int):
    """``DecodingRules.process`` applies ``no_repeat_ngram_size`` and
    ``encoder_no_repeat_ngram_size`` to one row by their effect (``ngrams.forbidden``,
    an index grown a token at a time): at every length of a reply that repeats itself
    and its prompt, the scores are transformers' own. Id 9 is past the scores' 9 ids
    (transformers leaves it out of the reply's rule)."""
    generator = torch.Generator().manual_seed(size)
    prompt = torch.randint(0, 6, (1, 12), generator=generator)
    processors = LogitsProcessorList(
        [
            NoRepeatNGramLogitsProcessor(size),
            TemperatureLogitsWarper(0.7),
            EncoderNoRepeatNGramLogitsProcessor(size, prompt),
        ]
    )
    rules = DecodingRules(GenerationConfig(), processors, StoppingCriteriaList())
    tokens = [9, *torch.randint(0, 6, (30,), generator=generator).tolist()]
    row = RowNgrams(tokens[:1])
    for length in range(1, len(tokens)):
        ids, scores = torch.tensor([tokens[:length]]), torch.randn(1, 9, generator=generator)
        processed = rules.process(made(ids), length, scores, row)
        assert torch.equal(processed, processors(ids, scores)), length
        row.append(tokens[length])


class _LongerThan(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([input_ids.shape[1] > self.length])


def test_a_rows_stopping_criteria_stop_it_as_transformers_do():
    """A maximum length and end-of-text ids end a one-row reply by their effect
    (``DecodingRules.stops``); other criteria still run, and any one ends it."""
    stopping = StoppingCriteriaList(
        [MaxLengthCriteria(8), EosTokenCriteria(torch.tensor([2, 5])), _LongerThan(6)]
    )
    rules = DecodingRules(GenerationConfig(), LogitsProcessorList(), stopping)
    for tokens in ([0, 1], [0, 2], [0, 3, 5], [0, 4, 4, 4, 4, 4, 4], [0] + [1] * 7, [2, 1]):
        ids = torch.tensor([tokens])
        assert rules.stops(RowNgrams(tokens), made(ids)) == bool(stopping(ids, None)[0]), tokens
