"""HTTP client of the chat service, with errors a person can read.

The page only ever talks to the service through this class, over plain HTTP with
``requests``, as the separate client of a microservice design.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:3000"


class ServiceError(RuntimeError):
    """The service could not answer; the message says why in plain words."""


@dataclass(frozen=True)
class ChatClient:
    url: str = DEFAULT_URL
    timeout_s: float = 600.0

    @classmethod
    def from_env(cls) -> ChatClient:
        """``CHATBOT_URL`` and ``CHATBOT_CLIENT_TIMEOUT_S``, read at each page run."""
        return cls(
            url=os.environ.get("CHATBOT_URL") or DEFAULT_URL,
            timeout_s=float(os.environ.get("CHATBOT_CLIENT_TIMEOUT_S") or 600),
        )

    def info(self) -> dict[str, Any]:
        return self._post("/info", {})

    def respond(self, messages: list[dict[str, str]], **options: Any) -> dict[str, Any]:
        """The service's reply to ``messages`` (None-valued options are left out)."""
        payload = {"messages": messages, **{k: v for k, v in options.items() if v is not None}}
        return self._post("/respond", payload)

    def _post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            response = requests.post(
                f"{self.url.rstrip('/')}{route}", json=payload, timeout=self.timeout_s
            )
        except requests.Timeout:
            raise ServiceError(
                f"The chat service at {self.url} did not answer within "
                f"{self.timeout_s:.0f} seconds."
            ) from None
        except requests.ConnectionError:
            raise ServiceError(
                f"The chat service at {self.url} cannot be reached. Is it running?"
            ) from None
        if response.status_code >= 400:
            raise ServiceError(_describe(response))
        return response.json()


def _describe(response: requests.Response) -> str:
    """One sentence from the service's error body, whatever its shape."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, dict):
        details = body.get("detail")
        if isinstance(details, list) and details:
            body = "; ".join(str(d.get("msg", d)) for d in details)
        else:
            body = body.get("error", body)
    kind = "rejected the message" if response.status_code < 500 else "failed"
    return f"The chat service {kind} (HTTP {response.status_code}): {body}"
