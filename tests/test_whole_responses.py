"""Responses that say their length leave whole (chatbot.http.whole_responses)."""

from __future__ import annotations

import asyncio

from chatbot.http.whole_responses import WholeResponses

BODY = [b'{"reply": ', b'"hello"}']


def app(length: bool):
    """A reply whose body comes in two parts, an event-loop turn apart, as BentoML's
    do under load."""

    async def asgi(scope, receive, send) -> None:
        headers = [(b"content-length", str(len(b"".join(BODY))).encode())] if length else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index, part in enumerate(BODY):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": part, "more_body": index == 0})

    return asgi


def sent_by(length: bool) -> list[tuple[str, int]]:
    """What reached the server: each message's type, and how many turns the app had
    taken by then."""
    sent: list[tuple[str, int]] = []
    turns = 0

    async def send(message) -> None:
        sent.append((message["type"], turns))

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0.001)
            turns += 1

    async def main() -> None:
        counting = asyncio.create_task(count_turns())
        await WholeResponses(app(length))({"type": "http"}, receive, send)
        counting.cancel()

    asyncio.run(main())
    return sent


def test_a_reply_with_a_length_leaves_in_one_go_once_complete():
    (start, start_turn), (body, body_turn) = sent_by(length=True)
    assert (start, body) == ("http.response.start", "http.response.body")
    assert start_turn == body_turn > 0  # nothing sent before the body was whole


def test_a_stream_leaves_as_it_is_written():
    sent = sent_by(length=False)
    assert [kind for kind, _ in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert sent[0][1] < sent[-1][1]
