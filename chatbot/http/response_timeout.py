"""BentoML's traffic timeout, without keeping every request alive for that long.

BentoML's ``TimeoutMiddleware`` (``traffic={"timeout": ...}``) schedules one timer per
request with ``loop.call_later`` and never cancels it. A timer holds a copy of the
request's context variables, and with them the request's tracing span, its
attributes and whatever else was current, until it fires: for the whole timeout
(660 s here) after the reply was sent. Found in the soak: one span per request stayed
alive, about 6 MiB per 1,000 requests that only levels off after eleven minutes of
traffic. This is the same cut-off (504 when no response has started in time; a
response that has started may stream on), whose timer ends with the request.
``service.py`` puts it in BentoML's place.
"""

from __future__ import annotations

import asyncio

from chatbot.http.asgi import ASGIApp, Message, Receive, Scope, Send, send_error


class ResponseStartTimeout:
    """ASGI middleware: 504 when ``app`` has not started its response in ``timeout`` s."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = asyncio.get_running_loop().create_future()

        async def noting_send(message: Message) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        app = asyncio.ensure_future(self.app(scope, receive, noting_send))
        # asyncio.wait cancels its own timer as soon as either is done.
        first = asyncio.FIRST_COMPLETED
        await asyncio.wait({started, app}, timeout=self.timeout, return_when=first)
        if not started.done() and app.cancel():
            message = f"Not able to process the request in {self.timeout} seconds"
            await send_error(send, 504, message)
            return
        await app
