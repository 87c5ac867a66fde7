"""Every POST route reads JSON: any other declared Content-Type is a 415 that says so.

BentoML parses a body by its Content-Type, and multipart form data is one of the
forms it reads; sent without a boundary (as a fuzzer or a hand-written client may),
the parser fails and the service answered 500 on ``/info``, ``/chat``, ``/respond``
and ``/generate``. No route of this service takes a form or a file, so anything but
JSON is refused up front, with the header to send instead. A body sent with no
Content-Type at all is read as JSON, as before.
"""

from __future__ import annotations

from chatbot.http.asgi import ASGIApp, Receive, Scope, Send, header, send_error


def is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class JsonOnly:
    """ASGI middleware: 415 for a POST whose declared Content-Type is not JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            declared = header(scope, b"content-type")
            if declared is not None and not is_json(declared):
                media_type = declared.split(";", 1)[0].strip() or "an empty Content-Type"
                return await send_error(
                    send, 415,
                    f"this route reads JSON, not {media_type}: "
                    "send the body with Content-Type: application/json",
                )  # fmt: skip
        await self.app(scope, receive, send)
