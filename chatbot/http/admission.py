"""Admission control: who may call, how big, how many at once, and for how long.

Every check runs before any model work, so junk, oversized bodies and bursts cost
the model nothing:

- ``401`` without ``Authorization: Bearer <CHATBOT_API_KEY>`` when a key is set
  (compared in constant time; health, metrics and the API docs stay open);
- ``413`` when the body is larger than ``CHATBOT_MAX_BODY_BYTES``;
- ``503`` with ``Retry-After`` when ``CHATBOT_MAX_CONCURRENCY`` requests are already
  being served, instead of an unbounded queue;
- ``504`` with a message when a request runs past ``CHATBOT_TIMEOUT_S``; the service
  keeps serving the others.

It sits inside ``RequestLog`` and relies on its record: requests without one (health
checks) and the service's own in-process calls (already admitted) pass straight on.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from dataclasses import dataclass

from starlette.responses import JSONResponse

from chatbot.http.asgi import ASGIApp, Message, Receive, Scope, Send, header, send_error
from chatbot.http.request_log import serving

DOC_PATHS = frozenset({"/", "/docs.json", "/schema.json"})
DOC_PREFIXES = ("/static_content/",)
_SMOOTHING = 0.2  # weight of the newest latency in the Retry-After estimate


class _TypicalLatency:
    """Smoothed latency of admitted requests: how long until a slot frees up."""

    def __init__(self) -> None:
        self.seconds = 1.0

    def add(self, seconds: float) -> None:
        self.seconds += _SMOOTHING * (seconds - self.seconds)

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.seconds))


typical_latency = _TypicalLatency()  # one service per process


def busy_response() -> JSONResponse:
    """503 for a request the batcher refused (it predicted too long a wait)."""
    wait_s = typical_latency.retry_after_s()
    return JSONResponse(
        {"error": f"The service is busy: the batch queue is full. Retry in about {wait_s} s."},
        status_code=503,
        headers={"Retry-After": str(wait_s)},
    )


@dataclass(frozen=True)
class Limits:
    api_key: str | None
    max_body_bytes: int
    max_concurrency: int
    timeout_s: float


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class Admission:
    """ASGI middleware enforcing ``Limits`` on each outside API request."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = serving()
        if record is None or record.admitted or _is_docs(scope):
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await send_error(
                send, 401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        try:
            body = await self._read_body(scope, receive)
        except _BodyTooLarge:
            return await send_error(
                send, 413, f"The request body is larger than {self.limits.max_body_bytes} "
                "bytes (CHATBOT_MAX_BODY_BYTES).",
            )  # fmt: skip
        except _ClientGone:
            return None
        if self.in_flight >= self.limits.max_concurrency:
            wait_s = typical_latency.retry_after_s()
            return await send_error(
                send, 503, f"The service is busy: {self.limits.max_concurrency} requests "
                f"are already being answered. Retry in about {wait_s} s.",
                {"Retry-After": str(wait_s)},
            )  # fmt: skip
        record.admitted = True
        await self._run(scope, _replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        if not self.limits.api_key:
            return True
        given = header(scope, b"authorization") or ""
        scheme, _, key = given.partition(" ")
        expected = self.limits.api_key.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), expected)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, refused as soon as it is known to be too large."""
        limit = self.limits.max_body_bytes
        declared = header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.in_flight += 1
        start = time.perf_counter()
        try:
            await asyncio.wait_for(self.app(scope, receive, tracked_send), self.limits.timeout_s)
        except TimeoutError:
            if not started:
                await send_error(
                    send, 504, f"No reply within {self.limits.timeout_s:g} s "
                    "(CHATBOT_TIMEOUT_S). The service is still up: retry, or ask for "
                    "fewer new tokens or beams.",
                )  # fmt: skip
        finally:
            self.in_flight -= 1
            typical_latency.add(time.perf_counter() - start)


def _is_docs(scope: Scope) -> bool:
    path = scope["path"]
    return scope["method"] in {"GET", "HEAD"} and (
        path in DOC_PATHS or path.startswith(DOC_PREFIXES)
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over the already-read body, then the real stream
    (which only has the disconnect notice left)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
