"""Validation errors as one readable sentence, the shape the OpenAPI spec promises.

BentoML answers invalid input with 400 and pydantic's error list under ``detail``,
while the spec it publishes declares ``detail`` a string, so clients generated from
the spec break on exactly the responses that explain what went wrong. This turns the
list into a sentence ("messages: List should have at least 1 item ...") and leaves
every other response untouched.
"""

from __future__ import annotations

import json
from typing import Any

from chatbot.http.asgi import ASGIApp, Receive, Scope, Send, rewriting_send


class ReadableValidationErrors:
    """ASGI middleware: rewrites the body of 400 answers that carry an error list."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        bad_request = rewriting_send(send, lambda start: start["status"] == 400, readable)
        await self.app(scope, receive, bad_request)


def readable(body: bytes) -> bytes:
    """``{"detail": [pydantic errors]}`` as ``{"detail": "field: message; ..."}``."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not (isinstance(data, dict) and isinstance(data.get("detail"), list)):
        return body
    data["detail"] = "; ".join(_sentence(error) for error in data["detail"])
    return json.dumps(data, ensure_ascii=False).encode()


def _sentence(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    where = ".".join(str(part) for part in error.get("loc", []))
    message = str(error.get("msg", error))
    return f"{where}: {message}" if where else message
