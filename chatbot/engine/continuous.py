"""Continuous batching as the service sees it: whole replies and streams, awaitable.

``ContinuousBatcher`` puts each request into the decode loop (``chatbot.engine.scheduler``)
and waits on the event loop for its tokens; the loop's thread never touches asyncio
objects except through ``call_soon_threadsafe``. A caller that stops waiting (client
gone, timeout) marks its reply cancelled, and the loop frees its rows at the next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from chatbot.engine.chat_engine import ChatEngine, PreparedReply
from chatbot.engine.decoding import TokenChoice
from chatbot.engine.plan import options_error
from chatbot.engine.scheduler import DecodeLoop, Job, LoopObserver, ReplySink
from chatbot.engine.streaming import ReplyStream
from chatbot.schemas import ChatReply, ReplyRequest

Finished = tuple[list[int], Sequence[TokenChoice]]
"""A finished reply's new token ids and their log-probabilities (when asked for)."""


class _WholeReply:
    """A ``ReplySink`` that resolves a future with the reply's token ids."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Finished] = self.loop.create_future()
        self._gone = threading.Event()

    def tokens(self, ids: list[int], choices: Sequence[TokenChoice]) -> None:
        pass  # a whole reply waits for the end

    def finish(self, output: list[int], choices: Sequence[TokenChoice]) -> None:
        self.loop.call_soon_threadsafe(self._settle, (output, choices), None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self._settle, None, error)

    def cancelled(self) -> bool:
        return self._gone.is_set()

    def leave(self) -> None:
        self._gone.set()

    def _settle(self, finished: Finished | None, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(finished or ([], ()))


class ContinuousBatcher:
    """Whole replies and streams of one engine, all decoded by one ``DecodeLoop``."""

    def __init__(
        self,
        engine: ChatEngine,
        max_rows: int,
        max_waiting: int,
        observer: LoopObserver | None = None,
    ) -> None:
        self.engine = engine
        self.loop = DecodeLoop(engine.model_step(), max_rows, max_waiting, observer)

    async def reply(self, request: ReplyRequest) -> ChatReply:
        """The whole reply (raises ``QueueFull`` when the waiting queue is full)."""
        prepared = self.engine.prepare(request)
        sink = _WholeReply()
        self._submit(prepared, sink)
        try:
            output, choices = await sink.future
        finally:
            sink.leave()  # a no-op once finished; frees the rows of an abandoned reply
        return self.engine.replies.chat_reply(prepared.prompt, output, prepared.plan, choices)

    def close(self) -> None:
        self.loop.close()

    async def generate(self, requests: Sequence[ReplyRequest]) -> list[ChatReply]:
        return list(await asyncio.gather(*(self.reply(r) for r in requests)))

    def stream(self, request: ReplyRequest) -> ReplyStream:
        """The reply as it is written (call inside a coroutine); beam search cannot
        stream, which ``ChatEngine.check_streamable`` refuses first."""
        self.engine.check_streamable(request)
        prepared = self.engine.prepare(request)
        plan, replies = prepared.plan, self.engine.replies
        stream = ReplyStream(
            self.engine.tokenizer, prepared.prompt, replies.finish_reason_of(plan), plan.stops,
            None if plan.top_logprobs is None else replies.token_logprobs,
        )  # fmt: skip
        self._submit(prepared, stream)
        return stream

    def _submit(self, prepared: PreparedReply, sink: ReplySink) -> None:
        beams, rows = prepared.plan.num_beams, self.loop.max_rows
        if beams > rows:
            raise options_error(
                "num_beams", beams, f"this service decodes at most {rows} beams (CHATBOT_MAX_ROWS)"
            )
        self.loop.submit(
            Job(
                prompt=list(prepared.prompt.input_ids),
                rows=prepared.plan.num_beams,
                start_decoding=prepared.start_decoding,
                sink=sink,
                finish_reason=self.engine.replies.finish_reason_of(prepared.plan),
            )
        )
