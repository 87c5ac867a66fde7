"""One reply streamed as ``generate`` writes it.

Streaming cannot share the batched ``generate`` call (each token must leave as soon
as it exists), so a streamed reply runs its own ``generate`` in a worker thread and
hands text pieces to the event loop through transformers' ``AsyncTextIteratorStreamer``.
A client that goes away stops the generation at the next token instead of leaving
it to run to ``max_new_tokens``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import cast

import torch
from transformers import (
    AsyncTextIteratorStreamer,
    PreTrainedTokenizerBase,
    StoppingCriteria,
)

from chatbot.prompts.blenderbot import EncodedConversation


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

    Create it inside a coroutine: pieces are delivered on the running event loop.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        generate: Generate,
        prompt: EncodedConversation,
        finish_reason: Callable[[list[int]], str],
    ) -> None:
        self.prompt_tokens = len(prompt.input_ids)
        self.truncated = prompt.truncated
        self._finish_reason = finish_reason
        self._streamer = _CountingStreamer(tokenizer)
        self._stop = _Cancelled()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(generate,), daemon=True)
        self._thread.start()

    def _run(self, generate: Generate) -> None:
        try:
            generate(self._streamer, self._stop)
        except BaseException as error:  # handed to the reader, never lost in the thread
            self._error = error
            self._streamer.end()

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text, piece by piece, leading whitespace removed as in ``/respond``."""
        started = False
        try:
            async for piece in self._streamer:
                piece = piece if started else piece.lstrip()
                if piece:
                    started = True
                    yield piece
        finally:
            self._stop.event.set()  # a no-op when generate has finished
        if self._error is not None:
            raise self._error

    @property
    def completion_tokens(self) -> int:
        return len(self._streamer.token_ids)

    @property
    def finish_reason(self) -> str:
        return self._finish_reason(self._streamer.token_ids)
