"""How long the server keeps an idle client connection open (``CHATBOT_KEEP_ALIVE_S``).

A pooled connection is closed by whichever side times out first. When the server goes
first, a client that sends on the connection at that moment gets a bare connection
error for a request the server never saw: with uvicorn's 5 s and httpx's 5 s pool
expiry, 5 of 600 requests sent on connections idle for 4.95-5.05 s failed that way
(``ReadError``, ``RemoteProtocolError``), the soak's lost requests. Every load
balancer and client pool must therefore time out before the server does, which needs
the server's keep-alive longer than theirs: AWS's load balancers keep idle
connections 60 s, nginx 60 s, Google Cloud's 600 s (which asks backends for 620).

BentoML's worker passes uvicorn its own keep-alive (``bentoml serve
--timeout-keep-alive``, 5 s unless named), a flag that neither a Bento's image nor
BentoCloud lets a deployment set from its environment. The worker imports the
service before it configures uvicorn, so the service sets it here instead.
"""

from __future__ import annotations

import functools
from typing import Any

import uvicorn

_CONFIGURE = uvicorn.Config.__init__


def keep_idle_connections(seconds: float) -> None:
    """Make every uvicorn server this process configures from now on keep idle
    connections ``seconds``, whatever keep-alive its caller passes."""

    @functools.wraps(_CONFIGURE)
    def with_keep_alive(self: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        _CONFIGURE(self, *args, **kwargs)
        self.timeout_keep_alive = seconds  # type: ignore[assignment]  # read per connection

    uvicorn.Config.__init__ = with_keep_alive  # type: ignore[method-assign]
