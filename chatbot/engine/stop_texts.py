"""Stop texts (OpenAI's ``stop``): the reply ends before the first one it writes.

Stop texts are matched on the reply's text, not its tokens: ``"\\nUser:"`` may be
written as one token, or as three, or end in the middle of a token. So three things
work on the decoded text:

- ``StopTexts``, a stopping criterion, ends the decoding at the step that writes one;
- ``cut`` takes the whole reply's text up to the first stop text;
- ``StopScanner`` gives a stream's text piece by piece and holds back any tail that
  could still become a stop text, so no part of one is ever sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop text in ``text`` starts, or None."""
    found = [at for stop in stops if (at := text.find(stop)) >= 0]
    return min(found, default=None)


def cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop text, and whether there was one."""
    at = first_stop(text, stops)
    return (text, False) if at is None else (text[:at], True)


class StopTexts(StoppingCriteria):
    """Ends a row once its new tokens' text contains a stop text.

    ``first_new`` is the column where the reply starts in the rows it sees (after
    the decoder start token, or after the prompt). It runs at every step, so a stop
    text is found at the step that completes it, within the newest tokens: only those
    are decoded (each character is at most 4 bytes, each token at least one; 2 more
    for a tokenizer that drops a slice's leading space). Decoding the whole reply
    each step cost 0.4 ms at 1,024 tokens, in the decode loop's one thread. Should a
    stop text hide among special tokens (which have no text) and pass unnoticed here,
    the reply's text is still cut at it (``cut``, ``StopScanner``).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], first_new: int
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.first_new = first_new
        self.window = 4 * max(len(stop) for stop in self.stops) + 2

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: object
    ) -> torch.BoolTensor:
        newest = max(self.first_new, input_ids.shape[1] - self.window)
        rows = input_ids[:, newest:].tolist()
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        hits = [first_stop(text, self.stops) is not None for text in texts]
        stop = torch.tensor(hits, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, stop)  # torch's tensor subclasses exist in its stubs only


class StopScanner:
    """A stream's text with stop texts held back: ``feed`` each piece, then ``end``.

    What is returned is safe to send: it can never turn out to be part of a stop
    text. Text after the first stop text is never returned.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        at = first_stop(self.text, self.stops)
        if at is not None:
            self.stopped = True
            return self._send_up_to(at)
        return self._send_up_to(len(self.text) - self._pending())

    def end(self) -> str:
        """The held-back tail, once no more text can come."""
        return "" if self.stopped else self._send_up_to(len(self.text))

    def _pending(self) -> int:
        """Length of the longest tail of the text that begins some stop text."""
        return max(
            (
                size
                for stop in self.stops
                for size in range(min(len(stop) - 1, len(self.text)), 0, -1)
                if self.text.endswith(stop[:size])
            ),
            default=0,
        )

    def _send_up_to(self, end: int) -> str:
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece
