"""One reply streamed as it is written.

Tokens come either from the decode loop (``CHATBOT_BATCHING=continuous``: the stream is
the loop's sink for that reply, its tokens come out of the shared batched step) or,
on the adaptive path, from a ``generate`` of its own in a worker thread (a stream
cannot share BentoML's whole-reply batch). Either way text pieces reach the event loop
through transformers' ``AsyncTextIteratorStreamer``, and a client that goes away stops
the reply at the next step instead of leaving it to run to ``max_new_tokens``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

import torch
from transformers import (
    AsyncTextIteratorStreamer,
    PreTrainedTokenizerBase,
    StoppingCriteria,
)

from chatbot.engine.decoding import TokenChoice
from chatbot.engine.stop_texts import StopScanner
from chatbot.prompts.blenderbot import EncodedConversation
from chatbot.schemas import TokenLogprob

Describe = Callable[[Sequence[TokenChoice]], list[TokenLogprob]]
"""Token choices in OpenAI's log-probability terms (``ReplyWriter.token_logprobs``)."""


class _Cancelled(StoppingCriteria):
    """Stops ``generate`` once ``event`` is set."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: object
    ) -> torch.BoolTensor:
        stop = torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )
        return cast(torch.BoolTensor, stop)  # torch's tensor subclasses exist in its stubs only


class _CountingStreamer(AsyncTextIteratorStreamer):
    """Also keeps the ids of the new tokens, for usage counts and the finish reason."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.token_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:  # the first put is the prompt (or start token)
            self.token_ids += value.flatten().tolist()
        super().put(value)


Generate = Callable[[AsyncTextIteratorStreamer, StoppingCriteria], object]


class ReplyStream:
    """Text pieces of one reply; after the last, ``completion_tokens`` and ``finish_reason``.

    Create it inside a coroutine: pieces are delivered on the running event loop. It is
    the decode loop's ``ReplySink`` for its reply (``tokens``/``finish``/``fail``/
    ``cancelled`` are called from the loop's thread).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt: EncodedConversation,
        finish_reason: Callable[[list[int]], str],
        stops: Sequence[str] = (),
        logprobs: Describe | None = None,
    ) -> None:
        """``stops``: the request's stop texts; ``logprobs``: how token choices are
        described, when the request asked for log-probabilities."""
        self.prompt_tokens = len(prompt.input_ids)
        self.truncated = prompt.truncated
        self._trim = not prompt.continues_text
        self._finish_reason = finish_reason
        self._streamer = _CountingStreamer(tokenizer)
        self._stop = _Cancelled()
        self._error: BaseException | None = None
        self._scanner = StopScanner(stops)
        self._describe = logprobs
        self._choices: list[TokenChoice] = []
        self._choices_taken = 0

    @classmethod
    def from_generate(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        generate: Generate,
        prompt: EncodedConversation,
        finish_reason: Callable[[list[int]], str],
        stops: Sequence[str] = (),
    ) -> ReplyStream:
        """A stream fed by ``generate(streamer, stopping_criterion)`` in a thread of its own."""
        stream = cls(tokenizer, prompt, finish_reason, stops)
        threading.Thread(target=stream._run, args=(generate,), daemon=True).start()
        return stream

    def _run(self, generate: Generate) -> None:
        try:
            generate(self._streamer, self._stop)
        except BaseException as error:  # handed to the reader, never lost in the thread
            self.fail(error)

    # The decode loop's ReplySink (chatbot.engine.scheduler)

    def tokens(self, ids: list[int], choices: Sequence[TokenChoice]) -> None:
        self._choices += choices  # before the text, so a piece never outruns its tokens'
        self._streamer.next_tokens_are_prompt = False  # the loop sends new tokens only
        self._streamer.put(torch.tensor(ids))

    def finish(self, output: list[int], choices: Sequence[TokenChoice]) -> None:
        self._streamer.end()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._streamer.end()

    def cancelled(self) -> bool:
        return self._stop.event.is_set()

    def cancel(self) -> None:
        """Nobody will read this stream: its reply stops at the next step."""
        self._stop.event.set()

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text, piece by piece, leading whitespace removed as in ``/respond``,
        up to its first stop text (no part of which is ever sent)."""
        started = False
        try:
            async for piece in self._streamer:
                piece = self._scanner.feed(piece)
                piece = piece if started or not self._trim else piece.lstrip()
                if piece:
                    started = True
                    yield piece
        finally:
            self._stop.event.set()  # a no-op when generate has finished
        if self._error is not None:
            raise self._error
        if tail := self._scanner.end():
            yield tail if started or not self._trim else tail.lstrip()

    def new_logprobs(self) -> list[TokenLogprob] | None:
        """Log-probabilities of the tokens that arrived since the last call (None when
        the request did not ask for them)."""
        if self._describe is None:
            return None
        fresh = self._choices[self._choices_taken :]
        self._choices_taken += len(fresh)
        return self._describe(fresh)

    @property
    def completion_tokens(self) -> int:
        return len(self._streamer.token_ids)

    @property
    def finish_reason(self) -> str:
        if self._scanner.stopped:
            return "stop"
        return self._finish_reason(self._streamer.token_ids)
