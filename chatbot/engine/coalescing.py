"""Requests that arrive together enter the batcher together.

BentoML's dispatcher starts a batch as soon as it is idle and sees a request. When a
burst of conversations arrives (32 clients at once), the first one or two are parsed
first and go out alone; the other thirty wait for that batch to finish before they
get their own, so the burst takes two model calls instead of one. In the quick
benchmark (32 greedy replies at once, real 400M architecture, 2 CPU cores) coalescing
took the burst from 15.3 s to 12.8 s (``benchmarks/results/``, README).

A ``Coalescer`` holds each request until no new one has arrived for ``quiet_s``
(at most ``max_wait_s`` after the first), then hands the whole group to the batch API
in one call; the dispatcher still merges it with anything else queued (its own
``adaptive_batch_size`` metric then counts calls; ``chatbot_batch_conversations``
counts conversations). Alone, a request waits ``quiet_s`` (50 ms by default, about
1.5% of the quickest real reply).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class _Group(Generic[In, Out]):
    def __init__(self, started: float) -> None:
        self.items: list[In] = []
        self.started = started
        self.last_arrival = started
        self.results: asyncio.Future[list[Out]] = asyncio.get_running_loop().create_future()


class Coalescer(Generic[In, Out]):
    def __init__(
        self,
        submit: Callable[[list[In]], Awaitable[list[Out]]],
        quiet_s: float,
        max_wait_s: float,
    ) -> None:
        self._submit = submit
        self._quiet_s = quiet_s
        self._max_wait_s = max_wait_s
        self._open: _Group[In, Out] | None = None

    async def __call__(self, item: In) -> Out:
        """``item``'s result, computed in one batch call with its group."""
        if self._quiet_s <= 0:
            (result,) = await self._submit([item])
            return result
        now = asyncio.get_running_loop().time()
        group = self._open
        if group is None:
            group = self._open = _Group(now)
            asyncio.get_running_loop().create_task(self._release(group))
        group.items.append(item)
        group.last_arrival = now
        index = len(group.items) - 1
        # Shielded: a caller that goes away must not cancel its group's call.
        return (await asyncio.shield(group.results))[index]

    async def _release(self, group: _Group[In, Out]) -> None:
        loop = asyncio.get_running_loop()
        while (now := loop.time()) < (
            deadline := min(group.last_arrival + self._quiet_s, group.started + self._max_wait_s)
        ):
            await asyncio.sleep(deadline - now)
        self._open = None
        try:
            group.results.set_result(await self._submit(group.items))
        except asyncio.CancelledError:
            group.results.cancel()
            raise
        except Exception as error:  # every member hears of it
            group.results.set_exception(error)
            group.results.exception()  # retrieved: its callers may all have left
