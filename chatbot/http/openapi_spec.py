"""What the OpenAPI spec BentoML publishes leaves out, added as it is served.

- BentoML documents 200, 400, 404 and 500 for each API route. Admission control also
  answers 401 (API key), 413 (body size), 503 (busy, with Retry-After) and 504
  (timeout); a client generated from the spec should know them.
- Its request schemas drop ``null`` from optional fields (``do_sample: bool | None``
  becomes ``boolean``) although ``null`` is their documented default and is accepted;
  such fields are marked ``nullable`` (the OpenAPI 3.0 way).
- It copies the ``/v1`` FastAPI app's schemas as they are, in OpenAPI 3.1 terms,
  into a spec that says 3.0; they are rewritten in 3.0 terms.

Both were found by fuzzing the service from its own spec (``tests/test_fuzz.py``).
"""

from __future__ import annotations

import json
from typing import Any

from chatbot.http.asgi import ASGIApp, Receive, Scope, Send, rewriting_send

SPEC_PATH = "/docs.json"
_ERROR_BODY = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {"error": {"type": "string"}},
            "required": ["error"],
        }
    }
}
ADMISSION_RESPONSES = {
    "401": "Missing or wrong API key (only when CHATBOT_API_KEY is set)",
    "413": "Request body larger than CHATBOT_MAX_BODY_BYTES",
    "503": "Busy: CHATBOT_MAX_CONCURRENCY requests in flight; see Retry-After",
    "504": "No reply within CHATBOT_TIMEOUT_S",
}


def completed(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the admission answers and nullable optional fields."""
    for operations in spec.get("paths", {}).values():
        if post := operations.get("post"):
            responses = post.setdefault("responses", {})
            for status, description in ADMISSION_RESPONSES.items():
                responses.setdefault(status, {"description": description, "content": _ERROR_BODY})
    _as_openapi_30(spec)
    return spec


def _as_openapi_30(node: Any) -> None:
    """Schemas in OpenAPI 3.0 terms, which is what the spec says it is.

    BentoML's own schemas drop ``null`` from optional fields, so every schema with a
    type and a ``null`` default is marked ``nullable``. The mounted FastAPI app's
    schemas (``/v1``) are JSON Schema 2020 (OpenAPI 3.1): ``anyOf [X, null]``,
    ``const`` and numeric ``exclusiveMinimum`` are rewritten in the 3.0 forms.
    """
    if isinstance(node, dict):
        options = node.get("anyOf", [])
        if {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            del node["anyOf"]
            if len(rest) == 1 and "$ref" not in rest[0]:
                node.update(rest[0])
            else:
                node["anyOf" if len(rest) > 1 else "allOf"] = rest
            node["nullable"] = True
        if "type" in node and "default" in node and node["default"] is None:
            node["nullable"] = True
        if "const" in node:
            node["enum"] = [node.pop("const")]
        for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(bound), (int, float)) and not isinstance(node[bound], bool):
                node[limit], node[bound] = node[bound], True
        for value in node.values():
            _as_openapi_30(value)
    elif isinstance(node, list):
        for value in node:
            _as_openapi_30(value)


class CompletedSpec:
    """ASGI middleware: rewrites the served OpenAPI spec, nothing else."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != SPEC_PATH:
            return await self.app(scope, receive, send)
        spec_send = rewriting_send(send, lambda start: start["status"] == 200, _completed_body)
        await self.app(scope, receive, spec_send)


def _completed_body(body: bytes) -> bytes:
    return json.dumps(completed(json.loads(body))).encode()
