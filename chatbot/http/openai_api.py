"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``
and ``GET /v1/models``.

Any OpenAI client (the official ``openai`` package, LangChain, Open WebUI, curl
scripts) can talk to the service. Replies, whole or streamed, are batched like
``/respond``'s (the decode loop, or adaptive batching); ``stream: true`` sends them as
server-sent events, ``n`` replies to one request are decoded together. Which fields
are honoured, refused or ignored is ``chatbot.http.openai_schemas``' business; the
README has the table.

``model`` may be any name: one server serves one model, and clients often send a fixed
name; every answer's ``model`` field (and ``GET /v1/models``) names the real one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from chatbot.http.admission import busy_response
from chatbot.http.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Refused,
    SamplingFields,
)
from chatbot.http.request_log import note_ignored, note_tokens
from chatbot.schemas import ChatReply, ModelInfo, ReplyRequest, TokenLogprob

if TYPE_CHECKING:  # the engine, torch and transformers load in the service's workers only
    from chatbot.engine.streaming import ReplyStream

T = TypeVar("T")


class ChatBackend(Protocol):
    """What the routes need from the service (``service.Chatbot`` provides it)."""

    async def model_info(self) -> ModelInfo: ...

    async def reply(self, request: ReplyRequest) -> ChatReply: ...

    async def stream(self, request: ReplyRequest) -> ReplyStream: ...


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class Delta:
    """What one choice of a stream adds: text, its tokens' log-probabilities, and
    at the end why it finished."""

    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


async def _deltas(stream: ReplyStream) -> AsyncIterator[Delta]:
    async for piece in stream.pieces():
        yield Delta(piece, stream.new_logprobs())
    yield Delta(logprobs=stream.new_logprobs(), finish_reason=stream.finish_reason)


async def _merged(streams: Sequence[ReplyStream]) -> AsyncIterator[tuple[int, Delta]]:
    """Every choice's deltas as they come, with its index; the first error ends them all."""
    queue: asyncio.Queue[tuple[int, Delta | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: ReplyStream) -> None:
        try:
            async for delta in _deltas(stream):
                await queue.put((index, delta))
        except Exception as error:
            await queue.put((index, error))
        else:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a client that left stops every choice at its next step


async def _all_or_none(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Every call's result; when one fails, the others are cancelled (their rows freed)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _streams(backend: ChatBackend, requests: Sequence[ReplyRequest]) -> list[ReplyStream]:
    """One stream per request; when one is refused, those already started stop."""
    streams: list[ReplyStream] = []
    try:
        for request in requests:
            streams.append(await backend.stream(request))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


class _Answer:
    """What every answer to one request shares: id, creation time, model name."""

    def __init__(self, prefix: str, obj: str, model: str) -> None:
        self.base = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": model,
        }

    def whole(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {**self.base, "choices": choices, "usage": usage}

    def chunk(self, choice: dict[str, Any], **extra: object) -> str:
        return _sse({**self.base, "choices": [choice], **extra})

    def usage_chunk(self, usage: dict[str, int]) -> str:
        return _sse({**self.base, "choices": [], "usage": usage})


def _usage_of(replies: Sequence[ChatReply | ReplyStream], per_prompt: int) -> dict[str, int]:
    """Each prompt is read once, however many replies it gets."""
    prompt = sum(reply.prompt_tokens for reply in replies[::per_prompt])
    return _usage(prompt, sum(reply.completion_tokens for reply in replies))


def _stream_usage(streams: Sequence[ReplyStream], per_prompt: int) -> dict[str, int]:
    """Finished streams' usage. The request's log line counts what the model read and
    wrote, as for whole replies (counted where they are made): each choice's prompt."""
    for stream in streams:
        note_tokens(stream.prompt_tokens, stream.completion_tokens)
    return _usage_of(streams, per_prompt)


# --- chat completions ---------------------------------------------------------------


def _chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {"content": [t.model_dump() for t in logprobs], "refusal": None}


def chat_choice(index: int, reply: ChatReply) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": reply.reply},
        "logprobs": _chat_logprobs(reply.logprobs),
        "finish_reason": reply.finish_reason,
    }


async def _chat_events(
    streams: list[ReplyStream], answer: _Answer, include_usage: bool
) -> AsyncIterator[str]:
    for index in range(len(streams)):
        yield answer.chunk({
            "index": index, "delta": {"role": "assistant", "content": ""},
            "logprobs": None, "finish_reason": None,
        })  # fmt: skip
    async for index, delta in _merged(streams):
        if delta.finish_reason is None:
            content: dict[str, str] = {"content": delta.text}
        else:
            content = {}
        choice = {
            "index": index, "delta": content,
            "logprobs": _chat_logprobs(delta.logprobs), "finish_reason": delta.finish_reason,
        }  # fmt: skip
        # ``truncated`` (not OpenAI's; clients ignore it) tells the chat page to say so.
        extra = {"truncated": streams[index].truncated} if delta.finish_reason else {}
        yield answer.chunk(choice, **extra)
    usage = _stream_usage(streams, len(streams))
    if include_usage:
        yield answer.usage_chunk(usage)


# --- completions ---------------------------------------------------------------------


def _legacy_logprobs(logprobs: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    """The completions API's older shape: parallel lists, alternatives as a dict,
    and each token's character offset in the choice's text."""
    if logprobs is None:
        return None
    offsets = []
    for token in logprobs:
        offsets.append(offset)
        offset += len(token.token)
    return {
        "tokens": [t.token for t in logprobs],
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in logprobs],
        "text_offset": offsets,
    }


def _completion_choices(body: CompletionRequest, replies: list[ChatReply]) -> list[dict[str, Any]]:
    choices = []
    for index, reply in enumerate(replies):
        prompt = body.prompts[index // body.n] if body.echo else ""
        choices.append({
            "index": index, "text": prompt + reply.reply,
            "logprobs": _legacy_logprobs(reply.logprobs, len(prompt)),
            "finish_reason": reply.finish_reason,
        })  # fmt: skip
    return choices


async def _completion_events(
    body: CompletionRequest, streams: list[ReplyStream], answer: _Answer
) -> AsyncIterator[str]:
    written = [0] * len(streams)  # characters sent per choice, for text offsets
    if body.echo:
        for index in range(len(streams)):
            prompt = body.prompts[index // body.n]
            written[index] = len(prompt)
            yield answer.chunk(
                {"index": index, "text": prompt, "logprobs": None, "finish_reason": None}
            )
    async for index, delta in _merged(streams):
        logprobs = _legacy_logprobs(delta.logprobs, written[index])
        written[index] += len(delta.text)
        yield answer.chunk({
            "index": index, "text": delta.text, "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        })  # fmt: skip
    usage = _stream_usage(streams, body.n)
    if body.include_usage:
        yield answer.usage_chunk(usage)


# --- the app -------------------------------------------------------------------------


async def _stream_or_whole(
    backend: ChatBackend,
    body: SamplingFields,
    requests: Sequence[ReplyRequest],
    whole: Callable[[list[ChatReply]], dict[str, Any]],
    events: Callable[[list[ReplyStream]], AsyncIterator[str]],
) -> Response | dict[str, Any]:
    note_ignored(body.all_ignored())
    if not body.stream:
        return whole(await _all_or_none([backend.reply(r) for r in requests]))
    streams = await _streams(backend, requests)

    async def with_errors() -> AsyncIterator[str]:
        try:
            async for event in events(streams):
                yield event
        except Exception as error:  # headers are gone: the error travels as an event
            yield _sse(_error_body(f"generation failed: {error}", "server_error"))
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        with_errors(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )  # fmt: skip


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

    @app.exception_handler(Refused)
    async def refused(_: Request, error: Refused) -> Response:
        body = ErrorBody(
            error=ErrorDetail(message=str(error), type="invalid_request_error", param=error.field)
        )
        return JSONResponse(body.model_dump(), status_code=400)

    @app.post("/chat/completions", response_model=None, responses=_DOCUMENTED_RESPONSES)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> Response | dict[str, Any]:
        backend: ChatBackend = request.app.state.backend
        requests = body.requests()
        kind = "chat.completion.chunk" if body.stream else "chat.completion"
        answer = _Answer("chatcmpl", kind, (await backend.model_info()).model)

        def whole(replies: list[ChatReply]) -> dict[str, Any]:
            choices = [chat_choice(i, reply) for i, reply in enumerate(replies)]
            return answer.whole(choices, _usage_of(replies, body.n))

        def events(streams: list[ReplyStream]) -> AsyncIterator[str]:
            return _chat_events(streams, answer, body.include_usage)

        return await _stream_or_whole(backend, body, requests, whole, events)

    @app.post("/completions", response_model=None, responses=_DOCUMENTED_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        """Continue raw text: a decoder-only model reads the prompt as it is (no chat
        template); Blenderbot takes it as one user turn."""
        backend: ChatBackend = request.app.state.backend
        requests = body.requests()
        answer = _Answer("cmpl", "text_completion", (await backend.model_info()).model)

        def whole(replies: list[ChatReply]) -> dict[str, Any]:
            return answer.whole(_completion_choices(body, replies), _usage_of(replies, body.n))

        def events(streams: list[ReplyStream]) -> AsyncIterator[str]:
            return _completion_events(body, streams, answer)

        return await _stream_or_whole(backend, body, requests, whole, events)

    return app
