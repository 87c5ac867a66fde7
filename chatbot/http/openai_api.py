"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Any OpenAI client (the official ``openai`` package, LangChain, curl scripts) can talk
to the service. Replies, whole or streamed, are batched like ``/respond``'s (the decode
loop, or adaptive batching); ``stream: true`` sends the reply as server-sent events.

Honoured fields: ``messages`` (system,
developer, user and assistant turns; text content), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``n`` (1 only),
``stream``, ``stream_options.include_usage`` and ``user`` (accepted, unused). Beyond
OpenAI: ``num_beams`` (send it with the client's ``extra_body``). A stream uses greedy
decoding unless asked otherwise, since beam search cannot stream; asking for both is
a 400. Other fields are refused with a 400 naming them, so nothing is silently ignored.

``model`` may be any name: one server serves one model, and clients often send a fixed
name; every answer's ``model`` field (and ``GET /v1/models``) names the real one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from chatbot.engine.streaming import ReplyStream
from chatbot.http.admission import busy_response
from chatbot.http.request_log import note_tokens
from chatbot.schemas import (
    MAX_BEAMS,
    MAX_NEW_TOKENS,
    MAX_TURNS,
    ChatReply,
    ChatRequest,
    Message,
    ModelInfo,
)

_MIN_TEMPERATURE = 0.01  # the engine's floor; OpenAI's (0, 0.01) rounds up to it


class ChatBackend(Protocol):
    """What the routes need from the service (``service.Chatbot`` provides it)."""

    async def model_info(self) -> ModelInfo: ...

    async def reply(self, request: ChatRequest) -> ChatReply: ...

    async def stream(self, request: ChatRequest) -> ReplyStream: ...


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class OpenAIMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_message(self) -> Message:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_TURNS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    num_beams: int | None = Field(default=None, ge=1, le=MAX_BEAMS)

    def to_chat_request(self) -> ChatRequest:
        """The same request in the service's own terms (may raise ValidationError)."""
        greedy = self.temperature == 0
        sampling = not greedy and (self.temperature is not None or self.top_p is not None)
        return ChatRequest(
            messages=[m.to_message() for m in self.messages],
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
            num_beams=self.num_beams or (1 if self.stream or sampling else None),
            do_sample=False if greedy else (True if sampling else None),
            temperature=max(self.temperature, _MIN_TEMPERATURE)
            if sampling and self.temperature
            else None,
            top_p=self.top_p if sampling else None,
        )


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(reply: ChatReply) -> dict[str, object]:
    return {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.reply},
            "finish_reason": reply.finish_reason,
        }],
        "usage": _usage(reply.prompt_tokens, reply.completion_tokens),
    }  # fmt: skip


class _Chunks:
    """``chat.completion.chunk`` events of one streamed reply, all with one id."""

    def __init__(self, model: str) -> None:
        self.base = {
            "id": _completion_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

    def event(
        self, delta: dict[str, str], finish_reason: str | None = None, **extra: object
    ) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _sse({**self.base, "choices": [choice], **extra})

    def usage(self, stream: ReplyStream) -> str:
        return _sse({**self.base, "choices": [], "usage": _usage(
            stream.prompt_tokens, stream.completion_tokens)})  # fmt: skip


def _sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(stream: ReplyStream, model: str, include_usage: bool) -> AsyncIterator[str]:
    chunks = _Chunks(model)
    yield chunks.event({"role": "assistant", "content": ""})
    try:
        async for piece in stream.pieces():
            yield chunks.event({"content": piece})
    except Exception as error:  # headers are gone: the error travels as an event
        yield _sse(_error_body(f"generation failed: {error}", "server_error"))
        return
    note_tokens(stream.prompt_tokens, stream.completion_tokens)
    # ``truncated`` (not OpenAI's; clients ignore it) tells the chat page to say so.
    yield chunks.event({}, stream.finish_reason, truncated=stream.truncated)
    if include_usage:
        yield chunks.usage(stream)
    yield "data: [DONE]\n\n"


def _error_body(message: str, kind: str) -> dict[str, object]:
    return ErrorBody(error=ErrorDetail(message=message, type=kind)).model_dump()


def _invalid(message: str) -> JSONResponse:
    return JSONResponse(_error_body(message, "invalid_request_error"), status_code=400)


def _readable(errors: Sequence[Any]) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape, which its clients turn into exceptions."""

    error: ErrorDetail


_DOCUMENTED_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The completion; with stream=true, server-sent chunk events",
        # One schema per server-sent event, as OpenAPI 3.2's itemSchema puts it.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            }
        },
    },
    400: {"model": ErrorBody, "description": "A request the model cannot honour"},
}


def build_openai_app(backend_errors: tuple[type[Exception], ...] = ()) -> FastAPI:
    """The ``/v1`` app; set ``app.state.backend`` (a ``ChatBackend``) before serving.

    ``backend_errors`` are the exceptions by which the backend says it is overloaded;
    they are answered 503 with ``Retry-After``, like everywhere else in the service.
    """
    app = FastAPI(title="OpenAI-compatible chat", openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> Response:
        """FastAPI's own refusals (an unparsable body, an unknown path) in OpenAI's shape."""
        body = _error_body(str(error.detail), "invalid_request_error")
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> Response:
        return _invalid(_readable(error.errors()))

    @app.exception_handler(ValidationError)
    async def invalid_conversation(_: Request, error: ValidationError) -> Response:
        return _invalid(_readable(error.errors()))

    for overloaded in backend_errors:
        app.add_exception_handler(overloaded, lambda *_: busy_response())

    @app.get("/models")
    async def models(request: Request) -> dict[str, object]:
        info = await request.app.state.backend.model_info()
        model = {"id": info.model, "object": "model", "created": 0, "owned_by": "chatbot"}
        return {"object": "list", "data": [model]}

    @app.post("/chat/completions", response_model=None, responses=_DOCUMENTED_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | dict:
        backend: ChatBackend = request.app.state.backend
        chat = body.to_chat_request()
        if not body.stream:
            return completion(await backend.reply(chat))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = await backend.stream(chat)
        info = await backend.model_info()  # a whole reply names its model itself
        return StreamingResponse(
            _events(stream, info.model, include_usage), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    return app
