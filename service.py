"""A chat model (Blenderbot or any Hugging Face chat model) as a BentoML service.

With ``CHATBOT_BATCHING=continuous`` (the default) every reply, whole or streamed, is
decoded by one decode loop per worker (``chatbot.engine.scheduler``): a conversation
joins the running batch at the next step and leaves it when done. With ``adaptive``,
whole replies funnel into ``generate``, a batchable API whose dispatcher merges
concurrent conversations into one padded ``model.generate`` call, and streams run
alone. ``/v1`` speaks OpenAI's chat API. The logic lives in the ``chatbot`` package;
this file only wires it to HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import bentoml
from bentoml._internal.server.http import traffic
from bentoml.exceptions import ServiceUnavailable
from bentoml.validators import ContentType
from opentelemetry.instrumentation import asgi as asgi_tracing
from pydantic import BaseModel, WithJsonSchema
from starlette.responses import JSONResponse

from chatbot.engine import precision_names
from chatbot.engine.coalescing import Coalescer
from chatbot.engine.errors import QueueFull
from chatbot.engine.gc_freeze import frozen_after_loading
from chatbot.engine.heap import keep_releasing_freed_memory
from chatbot.engine.own_thread import in_own_thread
from chatbot.http.admission import Admission, Limits, busy_response
from chatbot.http.json_only import JsonOnly
from chatbot.http.keep_alive import keep_idle_connections
from chatbot.http.loop_metrics import LoopMetrics
from chatbot.http.model_metrics import ModelInfoGauge
from chatbot.http.openai_api import build_openai_app
from chatbot.http.openapi_spec import CompletedSpec
from chatbot.http.process_metrics import ResidentMemory
from chatbot.http.readable_errors import ReadableValidationErrors
from chatbot.http.request_log import RequestLog, note_tokens
from chatbot.http.response_timeout import ResponseStartTimeout
from chatbot.http.whole_responses import WholeResponses
from chatbot.schemas import (
    ChatReply,
    ChatRequest,
    LegacyChatRequest,
    ModelInfo,
    ReplyRequest,
    TextRequest,
)
from chatbot.settings import Settings, display_name

if TYPE_CHECKING:  # the engine proper loads transformers: the workers import it (_load)
    from chatbot.engine.chat_engine import ChatEngine
    from chatbot.engine.compiled_step import Compilation
    from chatbot.engine.continuous import ContinuousBatcher
    from chatbot.engine.streaming import ReplyStream

settings = Settings.from_env()
# Refuse what this machine cannot run, now, and set the process up for what it can
# (without torch, which the supervisor would import for nothing else).
precision_names.prepare_process(
    precision_names.choose(settings.dtype, precision_names.gpu_present())
)
CONTINUOUS = settings.batching == "continuous"
BUSY = (ServiceUnavailable, QueueFull)  # the batcher's or the decode loop's queue is full
openai_v1 = build_openai_app(backend_errors=BUSY)
keep_idle_connections(settings.keep_alive_s)  # longer than any balancer's (see the module)
resident_memory = ResidentMemory(bentoml.metrics)
model_info = ModelInfoGauge(bentoml.metrics)
# The engine's news (its compiled step ready, say) in the service's log beside BentoML's.
logging.getLogger("chatbot.engine").setLevel(logging.INFO)


class BentoArgs(BaseModel):
    """Fixed into a Bento by ``bentoml build --arg model_tag=...`` (``make bento``),
    so the built Bento serves the model it carries whatever the environment says."""

    model_tag: str = settings.model_tag


args = bentoml.use_arguments(BentoArgs)

# /chat answers a JSON string, which ``requests.post(...).json()`` (the original design's
# client) reads as the reply. BentoML's own clients read the service's /schema.json and
# return any output whose schema says ``"type": "string"`` as raw text, JSON quotes and
# all; the same schema wrapped in ``anyOf`` makes them JSON-decode it, so they too get
# the plain reply.
ReplyText = Annotated[
    str,
    ContentType("application/json"),
    WithJsonSchema({"anyOf": [{"type": "string"}], "description": "The reply, a JSON string"}),
]

# The dispatcher's own adaptive_batch_size counts calls, and a coalesced call carries
# several conversations: this counts what shares one model.generate.
conversations_per_batch = bentoml.metrics.Histogram(
    name="chatbot_batch_conversations",
    documentation="Conversations answered by one call of the batch API",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


# BentoML's timeout middleware keeps each request's context alive for the whole
# timeout after the reply (chatbot.http.response_timeout); BentoML looks the class up
# by this name when it builds the app.
traffic.TimeoutMiddleware = ResponseStartTimeout  # type: ignore[misc, assignment]
# BentoML's tracing middleware opens a span for every message a response sends: 129 for
# a streamed 128-token reply, 5.2 ms of Python against 0.4 without, on the thread that
# shares the GIL with the decode loop. Each request keeps its own span; the spans of its
# messages go (OpenTelemetry's exclude_spans).
asgi_tracing.OpenTelemetryMiddleware = partial(  # type: ignore[misc, assignment]
    asgi_tracing.OpenTelemetryMiddleware, exclude_spans=["receive", "send"]
)


@bentoml.asgi_app(openai_v1, path="/v1")
@bentoml.service(
    traffic={
        # Admission answers 504 at CHATBOT_TIMEOUT_S; BentoML's own cut-off is a backstop.
        "timeout": settings.timeout_s + 60,
        # BentoCloud adds a replica past this many requests per replica, and holds the
        # rest in its own queue instead of piling them onto busy replicas.
        "concurrency": settings.target_concurrency,
        "external_queue": settings.external_queue,
    },
    # bentoml 1.4.31-1.4.40 close the in-process client every 100 requests, failing
    # the calls in flight (bentoml#5540); never recycling it avoids the drops.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class Chatbot:
    model = bentoml.models.BentoModel(args.model_tag)

    @bentoml.on_startup
    def start_loading(self) -> None:
        """Load the model in the background so /livez answers while it loads."""
        self.continuous: ContinuousBatcher | None = None
        self.compilation: Compilation | None = None  # None: nothing compiles (eager)
        self.loading = asyncio.create_task(in_own_thread(self._load))
        self.memory_watch = asyncio.create_task(resident_memory.keep_updated())
        if settings.release_memory_every_s > 0:
            self.memory_release = asyncio.create_task(
                keep_releasing_freed_memory(settings.release_memory_every_s)
            )
        openai_v1.state.backend = self
        # Adaptive mode: requests arriving together reach the batcher in one call
        # (chatbot.engine.coalescing); the decode loop needs no such help.
        # self.generate is looked up at each call: at startup it is still the plain
        # method, which would skip BentoML's batching dispatcher.
        coalescing = (settings.coalesce_ms / 1000, 10 * settings.coalesce_ms / 1000)
        self.batched: Coalescer[ChatRequest, ChatReply] = Coalescer(
            lambda requests: self.generate(requests), *coalescing
        )
        # Texts to continue (/v1/completions) are not conversations, which is all the
        # batch API's schema takes: they are batched among themselves.
        self.texts_batched: Coalescer[TextRequest, ChatReply] = Coalescer(
            self._continue_texts, *coalescing
        )

    def _load(self) -> ChatEngine:
        with frozen_after_loading():  # the engine's imports and weights: never garbage
            return self._load_engine()

    def _load_engine(self) -> ChatEngine:
        # Imported here, in the workers: `bentoml serve`'s supervisor imports this file
        # only to read the service, and transformers would cost it 3 s of CPU and 110 MB.
        from chatbot.engine.chat_engine import ChatEngine
        from chatbot.engine.compiled_step import attach_in_background
        from chatbot.engine.continuous import ContinuousBatcher

        metadata = self.model.info.metadata
        engine = ChatEngine.load(
            self.model.path,
            settings.model_name or display_name(metadata.get("source", str(self.model.tag))),
            pack_weights=settings.pack_weights,
            note=metadata.get("note") or None,
            dtype=settings.dtype,
        )
        model_info.show(engine.info())
        if CONTINUOUS:
            self.continuous = ContinuousBatcher(
                engine, settings.max_rows, settings.max_waiting, LoopMetrics(bentoml.metrics)
            )
            if settings.compile_step:  # one conversation's steps, faster once compiled
                self.compilation = attach_in_background(
                    self.continuous.loop.step,
                    self.model.path,
                    settings.dtype,
                    settings.pack_weights,
                    Path(settings.compile_cache),
                    settings.compile_batches,
                )
        return engine

    @bentoml.on_shutdown
    def stop_decoding(self) -> None:
        if self.continuous is not None:
            self.continuous.close()

    def __is_ready__(self) -> bool:
        return self.loading.done() and self.loading.exception() is None

    def __is_alive__(self) -> bool:
        return not (self.loading.done() and self.loading.exception() is not None)

    @bentoml.api(
        batchable=not CONTINUOUS,  # the decode loop batches per step instead
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )
    async def generate(self, requests: list[ChatRequest]) -> list[ChatReply]:
        """Answer many conversations; concurrent calls are batched together."""
        engine = await asyncio.shield(self.loading)
        if self.continuous is not None:
            return await self.continuous.generate(requests)
        conversations_per_batch.observe(len(requests))
        return await in_own_thread(partial(engine.generate, requests))

    @bentoml.api(input_spec=ChatRequest)
    async def respond(self, **request: Any) -> ChatReply:
        """Reply to ``messages`` with optional generation options."""
        try:
            return await self.reply(ChatRequest(**request))
        except BUSY:
            return busy_response()  # type: ignore[return-value]  # BentoML sends a Response as is

    @bentoml.api(input_spec=LegacyChatRequest)
    async def chat(self, **request: Any) -> ReplyText:
        """The original design's endpoint: the reply as a JSON string."""
        try:
            reply = await self.reply(LegacyChatRequest(**request).to_chat_request())
        except BUSY:
            return busy_response()  # type: ignore[return-value]  # BentoML sends a Response as is
        return JSONResponse(reply.reply)  # type: ignore[return-value]  # a bare str goes out as text/plain

    async def _continue_texts(self, requests: list[TextRequest]) -> list[ChatReply]:
        engine = await asyncio.shield(self.loading)
        return await in_own_thread(partial(engine.generate, requests))

    @bentoml.api
    async def info(self) -> ModelInfo:
        """The served model and the generation options it accepts."""
        return await self.model_info()

    # The ChatBackend of the /v1 routes (chatbot.http.openai_api), also used above.

    async def model_info(self) -> ModelInfo:
        engine = await asyncio.shield(self.loading)
        decode_step = "eager" if self.compilation is None else self.compilation.state
        return engine.info().model_copy(update={"decode_step": decode_step})

    async def stream(self, request: ReplyRequest) -> ReplyStream:
        """One reply as it is written: a decode-loop row, or its own ``generate``."""
        engine = await asyncio.shield(self.loading)
        if self.continuous is not None:
            return self.continuous.stream(request)
        return engine.stream(request)  # checks the request itself

    async def reply(self, request: ReplyRequest) -> ChatReply:
        """Batch ``request`` with the others; one of BUSY when the queue is full
        (or the batcher predicts a wait past CHATBOT_MAX_LATENCY_MS)."""
        engine = await asyncio.shield(self.loading)
        if self.continuous is not None:
            reply = await self.continuous.reply(request)
        else:
            engine.check_batchable(request)
            if isinstance(request, TextRequest):
                reply = await self.texts_batched(request)
            else:
                reply = await self.batched(request)
        note_tokens(reply.prompt_tokens, reply.completion_tokens)
        return reply


# Outermost first: a response that says its length leaves whole (a replica killed
# mid-reply has sent all of it or nothing a balancer could not retry), every outside
# request gets an id and a log line, a body that is not JSON is refused, then admission,
# then validation errors in the shape the OpenAPI spec declares, and the spec itself
# completed with what BentoML leaves out of it.
# (The decorators made Chatbot a bentoml.Service; mypy keeps a decorated class's own type.)
service = cast("bentoml.Service[Chatbot]", Chatbot)
service.add_asgi_middleware(WholeResponses)
service.add_asgi_middleware(RequestLog, log_content=settings.log_content)
service.add_asgi_middleware(JsonOnly)
service.add_asgi_middleware(
    Admission,
    limits=Limits(
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        max_concurrency=settings.max_concurrency,
        timeout_s=settings.timeout_s,
    ),
)
service.add_asgi_middleware(ReadableValidationErrors)
service.add_asgi_middleware(CompletedSpec)
