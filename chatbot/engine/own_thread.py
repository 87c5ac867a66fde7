"""Model work off the event loop, in threads that end with it.

PyTorch's CPU kernels parallelise with OpenMP, and GNU OpenMP keeps a team of worker
threads for every thread that has run a parallel region, for as long as that thread
lives. A second thread with a team of its own then runs slowly: measured on 2 cores,
an int8 layer took 1.8x as long and a small element-wise op 10x, whichever thread had
run first. ``asyncio.to_thread`` hands work to pool threads that live on, so the model
loaded in one of them slowed the decode loop's thread for good.

So model work that is not the decode loop's (loading and warming up the model,
adaptive batching's ``generate``) runs in a thread that ends when the work does, taking
its team along; the decode loop's thread is then the only one that keeps a team.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_own_thread(work: Callable[[], T]) -> T:
    """``work()`` in a new thread that ends with it; its result or its error."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]  # work returned it

    def run() -> None:
        try:
            result = work()
        except BaseException as error:  # handed to the awaiting task, never lost here
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="model-work", daemon=True).start()
    return await done
