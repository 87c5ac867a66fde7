"""OpenAI's frequency and presence penalties, as a transformers logits processor.

transformers has CTRL's ``repetition_penalty`` (it divides scores, and counts the
prompt) but not OpenAI's two, which clients such as LangChain and Open WebUI send.
OpenAI defines them on the tokens written so far (not the prompt):

    score[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import LogitsProcessor


class FrequencyPresencePenalty(LogitsProcessor):
    """``first_new`` is the column where the reply starts in the rows it sees."""

    def __init__(self, frequency: float, presence: float, first_new: int) -> None:
        self.frequency = frequency
        self.presence = presence
        self.first_new = first_new

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        written = input_ids[:, self.first_new :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, written, torch.ones_like(written, dtype=scores.dtype)
        )
        penalty = counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        return cast(torch.FloatTensor, scores - penalty)
