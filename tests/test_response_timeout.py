"""The traffic timeout that BentoML's place is given (chatbot.http.response_timeout)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware as BentoMLTimeout

from chatbot.http.response_timeout import ResponseStartTimeout

request_state: contextvars.ContextVar[object] = contextvars.ContextVar("request_state")


class State:
    """Something a request keeps in its context, as a tracing span is."""


def app(delay_s: float = 0.0, after_start_s: float = 0.0):
    async def asgi(scope, receive, send) -> None:
        await asyncio.sleep(delay_s)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(after_start_s)
        await send({"type": "http.response.body", "body": b"done"})

    return asgi


async def call(middleware, state: State | None = None) -> list[dict]:
    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    if state is not None:
        request_state.set(state)  # inside this request's task only
    await middleware({"type": "http"}, receive, send)
    return sent


# The variable itself caches the last value set: at most one state outlives its request.
@pytest.mark.parametrize(("middleware", "kept"), [(ResponseStartTimeout, 1), (BentoMLTimeout, 50)])
def test_nothing_of_a_request_outlives_it(middleware, kept):
    """BentoML's timer keeps each request's context (and so its span) for the whole
    timeout; ours lets it go with the reply."""
    states: list[weakref.ref[State]] = []

    async def main() -> int:
        timed = middleware(app(), timeout=600)
        for _ in range(50):
            state = State()
            states.append(weakref.ref(state))
            await asyncio.ensure_future(call(timed, state))
            del state
        gc.collect()
        return sum(ref() is not None for ref in states)

    assert asyncio.run(main()) == kept


def test_no_response_started_in_time_is_a_504():
    sent = asyncio.run(call(ResponseStartTimeout(app(delay_s=5), timeout=0.1)))
    assert sent[0]["status"] == 504
    assert b"0.1 seconds" in sent[1]["body"]


def test_a_response_started_in_time_may_take_longer():
    sent = asyncio.run(call(ResponseStartTimeout(app(after_start_s=0.3), timeout=0.1)))
    assert [m.get("status") for m in sent] == [200, None]
    assert sent[1]["body"] == b"done"


def test_an_app_that_fails_fails_at_once():
    async def failing(scope, receive, send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(asyncio.wait_for(call(ResponseStartTimeout(failing, timeout=600)), 5))
