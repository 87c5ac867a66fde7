"""The few ASGI pieces the middlewares share: types, header lookup, a JSON answer.

Plain ASGI rather than a framework's middleware base class: these wrap BentoML's
Starlette app from the outside and must not buffer or re-encode its responses.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (``name`` in lower case), if present."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    """Answer ``{"error": message}`` with ``status``: BentoML's own error shape."""
    body = json.dumps({"error": message}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def rewriting_send(
    send: Send, applies: Callable[[Message], bool], transform: Callable[[bytes], bytes]
) -> Send:
    """A ``send`` that holds a response ``applies`` picks (by its start message),
    collects its body and sends ``transform(body)`` with a corrected Content-Length.

    Only for small responses (error bodies, the API spec, the replies of
    ``chatbot.http.whole_responses``): they are held whole.
    """
    start: Message | None = None
    chunks: list[bytes] = []

    async def held_send(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and applies(message):
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = transform(b"".join(chunks))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return held_send
