"""HTTP client of the chat service, with errors a person can read.

The page only ever talks to the service through this class, over plain HTTP with
``requests``, as the separate client of a microservice design.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
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
        return self._post("/info", {}).json()

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
        payload = {"messages": messages, **_given(options)}
        return self._patiently("/respond", payload, on_busy).json()

    def stream(
        self,
        model: str,
        messages: list[dict[str, str]],
        on_busy: Callable[[float], None] | None = None,
        **options: Any,
    ) -> StreamedReply:
        """The reply as the service writes it, through the OpenAI-compatible route.

        Takes ``respond``'s options; only greedy decoding or sampling can stream.
        """
        payload = {
            "model": model, "messages": messages, "stream": True,
            **_given(_as_openai_options(**options)),
        }  # fmt: skip
        return StreamedReply(self._patiently("/v1/chat/completions", payload, on_busy, stream=True))

    def _patiently(
        self,
        route: str,
        payload: dict[str, Any],
        on_busy: Callable[[float], None] | None,
        stream: bool = False,
    ) -> requests.Response:
        retries = self.busy_retries
        while True:
            try:
                return self._post(route, payload, stream)
            except ServiceBusy as busy:
                if retries == 0:
                    raise
                retries -= 1
                if on_busy:
                    on_busy(busy.retry_after_s)
                time.sleep(busy.retry_after_s)

    def _post(self, route: str, payload: dict[str, Any], stream: bool = False) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = requests.post(
                f"{self.url.rstrip('/')}{route}", json=payload, headers=headers,
                timeout=self.timeout_s, stream=stream,
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
        return response


class StreamedReply:
    """Text pieces of a streamed reply; ``truncated`` is known once they are all read."""

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self.truncated = False

    def __iter__(self) -> Iterator[str]:
        with self._response:
            for line in self._response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ServiceError(f"The chat service failed: {event['error'].get('message')}")
                self.truncated = self.truncated or bool(event.get("truncated"))
                for choice in event.get("choices", []):
                    if text := choice.get("delta", {}).get("content"):
                        yield text
        raise ServiceError("The chat service stopped in the middle of the reply.")


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _as_openai_options(
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> dict[str, Any]:
    """``respond``'s options in OpenAI's terms (temperature 0 asks for greedy decoding)."""
    return {
        "max_tokens": max_new_tokens,
        "num_beams": num_beams,
        "temperature": 0 if do_sample is False else temperature,
        "top_p": top_p if do_sample is not False else None,
    }


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
