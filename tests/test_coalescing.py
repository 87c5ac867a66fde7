"""``Coalescer``: requests that arrive together reach the batch API in one call."""

from __future__ import annotations

import asyncio

import pytest

from chatbot.engine.coalescing import Coalescer


class Recorder:
    """A batch API that doubles its inputs and remembers each call's size."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await asyncio.sleep(0.05)
        if self.fail:
            raise RuntimeError("model failed")
        return [2 * i for i in items]


async def arrivals(coalescer: Coalescer, values: list[int], gap_s: float) -> list[int]:
    async def one(value: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return await coalescer(value)

    return await asyncio.gather(*(one(v, i * gap_s) for i, v in enumerate(values)))


def test_a_burst_goes_out_as_one_call_and_each_gets_its_own_result():
    api = Recorder()
    results = asyncio.run(arrivals(Coalescer(api, 0.05, 0.5), list(range(20)), 0.002))
    assert results == [2 * i for i in range(20)]
    assert api.calls == [list(range(20))]


def test_requests_apart_by_more_than_the_quiet_time_go_alone():
    api = Recorder()
    asyncio.run(arrivals(Coalescer(api, 0.02, 0.2), [1, 2, 3], 0.2))
    assert api.calls == [[1], [2], [3]]


def test_a_steady_stream_is_cut_at_the_longest_wait():
    api = Recorder()
    asyncio.run(arrivals(Coalescer(api, 0.05, 0.1), list(range(30)), 0.01))
    assert len(api.calls) >= 2
    assert sum(map(len, api.calls)) == 30


def test_zero_quiet_time_turns_coalescing_off():
    api = Recorder()
    asyncio.run(arrivals(Coalescer(api, 0, 0), [1, 2, 3], 0))
    assert api.calls == [[1], [2], [3]]


def test_a_caller_that_leaves_does_not_cancel_its_group():
    api = Recorder()
    coalescer = Coalescer(api, 0.02, 0.2)

    async def scenario() -> int:
        leaving = asyncio.ensure_future(coalescer(1))
        staying = asyncio.ensure_future(coalescer(2))
        await asyncio.sleep(0.01)
        leaving.cancel()
        return await staying

    assert asyncio.run(scenario()) == 4
    assert api.calls == [[1, 2]]


def test_a_failure_reaches_every_member_of_the_group():
    coalescer = Coalescer(Recorder(fail=True), 0.02, 0.2)

    async def scenario() -> list:
        return await asyncio.gather(coalescer(1), coalescer(2), return_exceptions=True)

    assert [str(e) for e in asyncio.run(scenario())] == ["model failed"] * 2


@pytest.mark.parametrize("quiet_s", [0.0, 0.02])
def test_results_never_cross_between_callers(quiet_s):
    api = Recorder()
    results = asyncio.run(arrivals(Coalescer(api, quiet_s, 0.1), list(range(50)), 0.001))
    assert results == [2 * i for i in range(50)]
