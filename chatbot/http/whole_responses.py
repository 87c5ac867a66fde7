"""A response that says its length leaves whole: its status line, headers and body
back to back, once the body is complete.

A balancer retries a request on another replica only while nothing of the response
has reached the client (HAProxy's ``retry-on``, the deployments' balancers). BentoML
sends a reply's status line and headers as soon as it has them and the body from an
iterator, an event-loop turn or more later: under load, 50 ms later. The replica drill
once killed a replica (SIGKILL) in between, and the client got a 200 with the body cut
short, which no balancer can retry (HAProxy's termination state ``SD``). Held back
until the body is complete, start and body go out in two writes with no await between
them, so a replica killed at any other moment has sent nothing of the reply. Streams
(server-sent events, no length) go out as written: once begun, no balancer can retry
them anyway.
"""

from __future__ import annotations

from chatbot.http.asgi import ASGIApp, Message, Receive, Scope, Send, rewriting_send


def says_its_length(start: Message) -> bool:
    return any(name.lower() == b"content-length" for name, _ in start.get("headers", []))


class WholeResponses:
    """ASGI middleware: every response with a Content-Length is sent whole."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.app(scope, receive, rewriting_send(send, says_its_length, lambda body: body))
