"""A reply's repeated n-grams, found a token at a time rather than anew at every step.

``no_repeat_ngram_size`` and ``encoder_no_repeat_ngram_size`` (3 and 3 in Blenderbot's
defaults) forbid a next token that would repeat an n-gram of the reply so far, or of
the prompt. transformers' processors work it out again at every step: the reply's
compares every window of its ids with its last n - 1 and builds a mask over the whole
vocabulary; the prompt's clones the scores and writes through a list index. That was
78 us a reply a step, 2.5 ms of a step of 32 Blenderbot-400M conversations (2-core
EPYC, int8), more than its LM head. For one row, the tokens they forbid follow from an
index of the reply's n-grams that grows by one window a step (``RowNgrams``), and
filling them with -inf gives the processors' scores bit for bit
(``tests/test_generation_options.py``). Beams keep the processors: their rows are
reordered at every step.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    LogitsProcessor,
    NoRepeatNGramLogitsProcessor,
)


class RowNgrams:
    """One row's tokens and, for each n-gram size asked about, the tokens that followed
    each (n - 1)-gram of them so far."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = list(tokens)
        self._followers: dict[int, dict[tuple[int, ...], list[int]]] = {}
        self._indexed: dict[int, int] = {}
        """By size: how many of the row's windows ``_followers`` holds."""

    def append(self, token: int) -> None:
        self.tokens.append(token)

    def repeats(self, size: int) -> list[int]:
        """The tokens that would complete a ``size``-gram the row already holds
        (``NoRepeatNGramLogitsProcessor``'s, where each window of the row that starts
        with its last ``size - 1`` tokens bans its own last token)."""
        followers = self._followers.setdefault(size, {})
        tokens, windows = self.tokens, len(self.tokens) - size + 1
        for start in range(self._indexed.get(size, 0), windows):
            end = start + size - 1
            followers.setdefault(tuple(tokens[start:end]), []).append(tokens[end])
        self._indexed[size] = max(windows, self._indexed.get(size, 0))
        if windows < 1:
            return []
        return followers.get(tuple(tokens[windows:]), [])


def forbidden(processor: LogitsProcessor, row: RowNgrams, vocabulary: int) -> list[int] | None:
    """The ids ``processor`` sets to -inf for ``row``'s next token, if it is an n-gram
    rule of one row (None: it is not; it must run)."""
    if type(processor) is NoRepeatNGramLogitsProcessor:
        return [token for token in row.repeats(processor.ngram_size) if token < vocabulary]
    if type(processor) is EncoderNoRepeatNGramLogitsProcessor and processor.batch_size == 1:
        tokens, size = row.tokens, processor.ngram_size
        last = tuple(tokens[len(tokens) + 1 - size : len(tokens)])  # as transformers slices
        return processor.generated_ngrams[0].get(last, [])
    return None
