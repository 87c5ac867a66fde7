"""One structured log line per API request.

Each line is a JSON object (request id, method, path, status, latency, token counts),
so a log pipeline can aggregate it without parsing prose. Message text is left out:
conversations are personal data. ``CHATBOT_LOG_CONTENT=true`` adds the request body
for debugging. Headers are never logged, so an API key cannot leak into the logs.

The record of the request being served lives in a context variable. The service's
own in-process calls (``/chat`` calling the batchable ``/generate`` through BentoML's
ASGI self-proxy) run in the caller's context, so they see that record: they are
recognised as part of the outer request, and neither logged nor counted twice.
A record counts only until its response's last byte is handed over: uvicorn starts a
pipelined request from inside that final send, so the next request on a keep-alive
connection inherits the context too, and must not pass for an in-process call.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field

from chatbot.http.asgi import ASGIApp, Message, Receive, Scope, Send, header

HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
_VALID_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

logger = logging.getLogger("chatbot.requests")


@dataclass
class RequestRecord:
    """What is known about the request being served, filled in as it runs."""

    request_id: str
    admitted: bool = False
    finished: bool = False  # the response's last byte has been handed over
    prompt_tokens: int = 0
    completion_tokens: int = 0
    content: str | None = None
    ignored: list[str] = field(default_factory=list)


current_request: ContextVar[RequestRecord | None] = ContextVar("current_request", default=None)


def serving() -> RequestRecord | None:
    """The outside request this code runs for, if one is still being answered."""
    record = current_request.get()
    return record if record is not None and not record.finished else None


def note_tokens(prompt_tokens: int, completion_tokens: int) -> None:
    """Add a reply's token counts to the current request's log line."""
    if record := serving():
        record.prompt_tokens += prompt_tokens
        record.completion_tokens += completion_tokens


def note_ignored(fields: list[str]) -> None:
    """Name request fields the service accepted without acting on them in the log line."""
    if record := serving():
        record.ignored += fields


def _log_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class RequestLog:
    """ASGI middleware: gives each outside request an id and logs it when done.

    A caller's ``X-Request-ID`` is kept when it is a plain token of at most 64
    characters, so ids can follow a request across services; otherwise one is made.
    The id is echoed in the response's ``X-Request-ID`` header.
    """

    def __init__(self, app: ASGIApp, log_content: bool = False) -> None:
        self.app = app
        self.log_content = log_content
        if not logger.handlers:
            logger.addHandler(_log_handler())
            logger.setLevel(logging.INFO)
            logger.propagate = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in HEALTH_PATHS
            or serving() is not None  # an in-process call
        ):
            return await self.app(scope, receive, send)
        given = header(scope, b"x-request-id")
        record = RequestRecord(
            request_id=given if given and _VALID_ID.fullmatch(given) else uuid.uuid4().hex
        )
        token = current_request.set(record)
        status: int | None = None
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", record.request_id.encode()),
                ]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record.finished = True
            await send(message)

        async def receive_content() -> Message:
            message = await receive()
            if self.log_content and message["type"] == "http.request":
                record.content = (record.content or "") + message.get("body", b"").decode(
                    "utf-8", "replace"
                )
            return message

        try:
            await self.app(scope, receive_content, send_with_id)
        finally:
            current_request.reset(token)
            self._write(scope, record, status, time.perf_counter() - start)

    def _write(
        self, scope: Scope, record: RequestRecord, status: int | None, seconds: float
    ) -> None:
        line = {
            "event": "request",
            "request_id": record.request_id,
            "method": scope["method"],
            "path": scope["path"],
            # None: the server was stopped, or the client left, before any answer.
            "status": status,
            "latency_ms": round(seconds * 1000, 1),
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
        }
        if record.ignored:
            line["ignored_fields"] = record.ignored
        if self.log_content:
            line["content"] = record.content
        logger.info(json.dumps(line, ensure_ascii=False))
