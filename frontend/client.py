"""HTTP client of the chat service, with errors a person can read.

The page only ever talks to the service through this class, over plain HTTP with
``requests``, as the separate client of a microservice design.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:3000"
BUSY_STATUSES = frozenset({429, 503})
MAX_WAIT_S = 30.0  # never sleep longer than this on one Retry-After


class ServiceError(RuntimeError):
    """The service could not answer; the message says why in plain words."""


class ServiceBusy(ServiceError):
    """The service refused for now (429/503); ``retry_after_s`` says when to retry."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ChatClient:
    url: str = DEFAULT_URL
    timeout_s: float = 600.0
    busy_retries: int = 3
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> ChatClient:
        """``CHATBOT_URL``, ``CHATBOT_CLIENT_TIMEOUT_S``, ``CHATBOT_CLIENT_RETRIES`` and
        ``CHATBOT_API_KEY``, read at each page run."""
        return cls(
            url=os.environ.get("CHATBOT_URL") or DEFAULT_URL,
            timeout_s=float(os.environ.get("CHATBOT_CLIENT_TIMEOUT_S") or 600),
            busy_retries=int(os.environ.get("CHATBOT_CLIENT_RETRIES") or 3),
            api_key=os.environ.get("CHATBOT_API_KEY", "").strip() or None,
        )

    def info(self) -> dict[str, Any]:
        return self._post("/info", {})

    def respond(
        self,
        messages: list[dict[str, str]],
        on_busy: Callable[[float], None] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """The service's reply to ``messages`` (None-valued options are left out).

        When the service is busy it is asked again after the wait it names in
        ``Retry-After`` (at most ``busy_retries`` times); ``on_busy`` hears of each
        wait, so a page can say what is happening.
        """
        payload = {"messages": messages, **{k: v for k, v in options.items() if v is not None}}
        retries = self.busy_retries
        while True:
            try:
                return self._post("/respond", payload)
            except ServiceBusy as busy:
                if retries == 0:
                    raise
                retries -= 1
                if on_busy:
                    on_busy(busy.retry_after_s)
                time.sleep(busy.retry_after_s)

    def _post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = requests.post(
                f"{self.url.rstrip('/')}{route}", json=payload, headers=headers,
                timeout=self.timeout_s,
            )  # fmt: skip
        except requests.Timeout:
            raise ServiceError(
                f"The chat service at {self.url} did not answer within "
                f"{self.timeout_s:.0f} seconds."
            ) from None
        except requests.ConnectionError:
            raise ServiceError(
                f"The chat service at {self.url} cannot be reached. Is it running?"
            ) from None
        if response.status_code in BUSY_STATUSES:
            raise ServiceBusy(_describe(response), _retry_after(response))
        if response.status_code >= 400:
            raise ServiceError(_describe(response))
        return response.json()


def _retry_after(response: requests.Response) -> float:
    """The service's ``Retry-After`` in seconds (1 when absent or a date)."""
    value = response.headers.get("Retry-After", "")
    return min(float(value), MAX_WAIT_S) if value.isdigit() else 1.0


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
    if response.status_code in BUSY_STATUSES:
        kind = "is busy"
    elif response.status_code < 500:
        kind = "rejected the message"
    else:
        kind = "failed"
    return f"The chat service {kind} (HTTP {response.status_code}): {body}"
