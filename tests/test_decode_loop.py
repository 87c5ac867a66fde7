"""The decode loop (continuous batching) on both tiny model families, in process.

Replies from the loop must be token-identical to transformers' ``generate`` on the
same request alone (fp32, greedy and beams), whatever else shares the steps or joins
mid-reply; a short reply must not wait for long ones; a client that leaves frees its
rows; one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_engine import PROMPTS, request

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.continuous import ContinuousBatcher
from chatbot.engine.cpu import at_least
from chatbot.engine.errors import QueueFull
from chatbot.engine.scheduler import RELEASE_AFTER_IDLE_S, Job
from chatbot.schemas import ChatReply, ChatRequest

OPTIONS = [
    pytest.param({"num_beams": 1, "max_new_tokens": 24}, id="greedy"),
    pytest.param({"num_beams": 3, "max_new_tokens": 20}, id="beams"),
    pytest.param({}, id="model-default"),
]


@pytest.fixture(params=["engine", "chat_engine"], ids=["blenderbot", "decoder-only"])
def family_engine(request: pytest.FixtureRequest) -> ChatEngine:
    return request.getfixturevalue(request.param)


def run(
    engine: ChatEngine, scenario: Callable[[ContinuousBatcher], object], **limits: int
) -> object:
    """``scenario(batcher)`` on a fresh decode loop over ``engine``, closed afterwards."""

    async def main() -> object:
        batcher = ContinuousBatcher(
            engine, limits.get("max_rows", 256), limits.get("max_waiting", 64)
        )
        try:
            return await scenario(batcher)  # type: ignore[misc]
        finally:
            batcher.close()

    return asyncio.run(main())


def replies_alone(engine: ChatEngine, requests: list[ChatRequest]) -> list[ChatReply]:
    return [engine.generate([r])[0] for r in requests]


@pytest.mark.parametrize("options", OPTIONS)
def test_replies_equal_generate_alone_token_for_token(family_engine, options):
    requests = [request(p, **options) for p in PROMPTS]
    together = run(family_engine, lambda b: b.generate(requests))
    assert together == replies_alone(family_engine, requests)


def staggered(
    requests: list[ChatRequest],
) -> Callable[[ContinuousBatcher], Awaitable[list[ChatReply]]]:
    """A scenario in which each request arrives while the earlier ones are written."""

    async def scenario(batcher: ContinuousBatcher) -> list[ChatReply]:
        async def later(index: int, r: ChatRequest) -> ChatReply:
            await asyncio.sleep(0.005 * index)
            return await batcher.reply(r)

        return list(await asyncio.gather(*(later(i, r) for i, r in enumerate(requests))))

    return scenario


@pytest.mark.parametrize("options", OPTIONS)
def test_replies_are_unchanged_by_what_joins_mid_reply(family_engine, options):
    """Each request arrives while the earlier ones are being written."""
    requests = [request(p, **options) for p in PROMPTS]

    assert run(family_engine, staggered(requests)) == replies_alone(family_engine, requests)


@pytest.fixture(
    params=["tiny_checkpoint", "tiny_chat_checkpoint"], ids=["blenderbot", "decoder-only"]
)
def family_checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("dtype", ["float32", "int8", "bfloat16", "int4"])
def test_every_precision_keeps_replies_identical_whatever_joins(family_checkpoint, dtype):
    """The kernels' row independence, end to end: greedy and beam replies joining
    mid-reply equal each reply computed alone, in every precision (the engine fixtures
    run in `auto`, which is bfloat16 on some CPUs and float32 on others)."""
    if dtype == "bfloat16" and not at_least("avx512_core"):
        pytest.skip("bfloat16 needs AVX-512")
    engine = ChatEngine.load(family_checkpoint, dtype, dtype=dtype)
    options = [param.values[0] for param in OPTIONS] * 2
    requests = [request(p, **o) for p, o in zip(PROMPTS, options, strict=True)]

    assert run(engine, staggered(requests)) == replies_alone(engine, requests)


def test_mixed_options_share_steps_and_stay_identical(family_engine):
    requests = [
        request(PROMPTS[0], num_beams=1, max_new_tokens=10),
        request(PROMPTS[1], num_beams=3, max_new_tokens=12),
        request(PROMPTS[2], num_beams=1, max_new_tokens=30),
        request(PROMPTS[3]),
        request(PROMPTS[4], num_beams=2, max_new_tokens=7),
    ]
    together = run(family_engine, lambda b: b.generate(requests))
    assert together == replies_alone(family_engine, requests)


def test_replies_that_wait_for_rows_take_over_those_of_finished_ones_exactly(family_engine):
    """Five rows: each reply waits for the rows (and a Blenderbot reply for the prompt
    row its beams share) that a finished one left, while the others go on."""
    lengths = [9, 4, 13, 6, 11, 5]
    requests = [
        request(prompt, num_beams=1 + index % 2, max_new_tokens=tokens)
        for index, (prompt, tokens) in enumerate(zip(PROMPTS, lengths, strict=True))
    ]
    together = run(family_engine, lambda b: b.generate(requests), max_rows=5)
    assert together == replies_alone(family_engine, requests)


def test_a_stream_gives_the_same_text_as_the_whole_reply(family_engine):
    whole = request(PROMPTS[2], num_beams=1, max_new_tokens=20)

    async def streamed(batcher: ContinuousBatcher) -> tuple[str, int, str]:
        stream = batcher.stream(whole)
        text = "".join([piece async for piece in stream.pieces()])
        return text, stream.completion_tokens, stream.finish_reason

    (expected,) = replies_alone(family_engine, [whole])
    text, tokens, finish = run(family_engine, streamed)
    assert (text.strip(), tokens, finish) == (
        expected.reply,
        expected.completion_tokens,
        expected.finish_reason,
    )


def test_a_short_reply_is_not_held_behind_long_ones(engine):
    long = [request(p, num_beams=1, max_new_tokens=120) for p in PROMPTS]
    short = request("hi", num_beams=1, max_new_tokens=2)

    async def scenario(batcher: ContinuousBatcher) -> tuple[float, list[float]]:
        async def timed(r: ChatRequest) -> float:
            await batcher.reply(r)
            return time.perf_counter()

        long_done = [asyncio.create_task(timed(r)) for r in long]
        stream = batcher.stream(long[0])  # the long batch is running once this streams
        await anext(aiter(stream.pieces()))
        short_done = await timed(short)
        return short_done, list(await asyncio.gather(*long_done))

    short_done, long_done = run(engine, scenario)
    assert short_done < min(long_done)


def test_a_client_that_leaves_frees_its_rows_at_the_next_step(engine):
    async def scenario(batcher: ContinuousBatcher) -> tuple[int, int]:
        stream = batcher.stream(request("hello", num_beams=1, max_new_tokens=120))
        pieces: AsyncIterator[str] = stream.pieces()
        await anext(pieces)
        running_while_read = len(batcher.loop.running)
        await pieces.aclose()  # the client went away
        for _ in range(200):
            if not batcher.loop.running:
                break
            await asyncio.sleep(0.005)
        return running_while_read, stream.completion_tokens

    running_while_read, written = run(engine, scenario)
    assert running_while_read == 1
    assert written < 120


def test_an_abandoned_whole_reply_frees_its_rows(engine):
    async def scenario(batcher: ContinuousBatcher) -> int:
        task = asyncio.create_task(batcher.reply(request("hi", num_beams=4, max_new_tokens=120)))
        while not batcher.loop.running:
            await asyncio.sleep(0.001)
        task.cancel()
        for _ in range(200):
            if not batcher.loop.running:
                break
            await asyncio.sleep(0.005)
        return batcher.loop.rows_in_use

    assert run(engine, scenario) == 0


def test_one_bad_request_fails_alone(engine):
    """A prompt with a token id outside the vocabulary breaks the encoder pass it
    shares with others: the loop retries them one by one and fails only it."""
    good = [request(p, num_beams=1, max_new_tokens=8) for p in PROMPTS[:3]]

    async def scenario(batcher: ContinuousBatcher) -> list[object]:
        bad = engine.prepare(good[0])
        bad_prompt = [*bad.prompt.input_ids, engine.model.config.vocab_size + 7]
        failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

        class Sink:
            def tokens(self, ids: list[int], choices: object) -> None: ...
            def finish(self, output: list[int], choices: object) -> None: ...
            def cancelled(self) -> bool:
                return False

            def fail(self, error: BaseException) -> None:
                failed.get_loop().call_soon_threadsafe(failed.set_result, error)

        reason = engine.replies.finish_reason_of(bad.plan)
        batcher.loop.submit(Job(bad_prompt, 1, bad.start_decoding, Sink(), reason))
        replies = asyncio.gather(*(batcher.reply(r) for r in good))
        return [await failed, *await replies]

    error, *replies = run(engine, scenario)
    assert isinstance(error, IndexError)
    assert replies == replies_alone(engine, good)


def test_requests_wait_for_rows_and_a_full_queue_is_refused(engine):
    """Two 2-beam replies fit in 4 rows; four more may wait; the rest are refused."""
    requests = [request(p, num_beams=2, max_new_tokens=100) for p in PROMPTS * 2]

    async def scenario(batcher: ContinuousBatcher) -> list[ChatReply | BaseException]:
        return await asyncio.gather(*(batcher.reply(r) for r in requests), return_exceptions=True)

    results = run(engine, scenario, max_rows=4, max_waiting=4)
    answered = [(r, q) for r, q in zip(results, requests, strict=True) if isinstance(r, ChatReply)]
    refused = [r for r in results if isinstance(r, QueueFull)]
    assert len(answered) + len(refused) == len(requests)
    assert 4 <= len(answered) <= 6  # the waiting four, and those already running
    assert [r for r, _ in answered] == replies_alone(engine, [q for _, q in answered])


def test_more_beams_than_rows_is_a_validation_error(engine):
    async def scenario(batcher: ContinuousBatcher) -> None:
        await batcher.reply(request("hi", num_beams=8))

    with pytest.raises(ValidationError, match="at most 4 beams"):
        run(engine, scenario, max_rows=4)


def test_stopping_the_loop_fails_what_it_holds_instead_of_leaving_it_hanging(engine):
    async def scenario(batcher: ContinuousBatcher) -> list[ChatReply | BaseException]:
        asking = [batcher.reply(request(p, num_beams=1, max_new_tokens=120)) for p in PROMPTS]
        replies = asyncio.gather(*asking, return_exceptions=True)
        while not batcher.loop.running:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(batcher.close)
        return await asyncio.wait_for(replies, timeout=30)

    results = run(engine, scenario, max_rows=2)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert "stopped" in str(results[-1])


def test_an_idle_loop_gives_its_key_value_buffers_back(family_engine):
    """A burst's buffers are not kept for good; the next reply is still exact."""
    first, second = request(PROMPTS[0], max_new_tokens=8), request(PROMPTS[1], max_new_tokens=8)

    async def burst_then_idle(batcher: ContinuousBatcher) -> tuple[int, int, ChatReply]:
        await batcher.generate([first] * 4)
        held = batcher.loop.step.slots.capacity
        await asyncio.sleep(RELEASE_AFTER_IDLE_S + 0.5)
        return held, batcher.loop.step.slots.capacity, await batcher.reply(second)

    held, idle, reply = run(family_engine, burst_then_idle)
    assert held >= 4
    assert idle == 0
    assert reply == replies_alone(family_engine, [second])[0]
