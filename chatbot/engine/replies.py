"""New token ids made into the reply the API answers, the same for both batching modes.

What a reply says besides its text is decided here once: where a stop text cuts it, why
it ended (its end token, a stop text, or the length limit), and its tokens'
log-probabilities in OpenAI's terms (a token's exact bytes; special tokens, which the
text leaves out, left out too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

from chatbot.engine import stop_texts
from chatbot.engine.decoding import TokenChoice
from chatbot.engine.plan import DecodingPlan
from chatbot.engine.token_bytes import token_bytes
from chatbot.prompts.blenderbot import EncodedConversation
from chatbot.schemas import ChatReply, FinishReason, TokenLogprob, TopLogprob


class ReplyWriter:
    """Writes one model's replies: its tokenizer, its end tokens, its name."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        eos_ids: frozenset[int],
        forces_eos: bool,
    ) -> None:
        self.tokenizer, self.model_name, self.eos_ids = tokenizer, model_name, eos_ids
        self.forces_eos = forces_eos
        """Blenderbot forces an end token at the length limit (``forced_eos_token_id``)."""
        self.textless_ids = eos_ids | frozenset(tokenizer.all_special_ids)
        """Ids the reply's text leaves out: end tokens and special tokens."""

    def chat_reply(
        self,
        prompt: EncodedConversation,
        output: list[int],
        plan: DecodingPlan,
        choices: Sequence[TokenChoice] = (),
    ) -> ChatReply:
        """The reply to ``prompt`` whose new token ids are ``output`` (up to its
        first stop text), with ``choices``' log-probabilities when the plan asks."""
        text, stopped = stop_texts.cut(self.decode(output), plan.stops)
        return ChatReply(
            reply=text if prompt.continues_text else text.strip(),
            model=self.model_name,
            prompt_tokens=len(prompt.input_ids),
            completion_tokens=len(output),
            truncated=prompt.truncated,
            finish_reason="stop" if stopped else self._finish_reason(output, plan),
            logprobs=None if plan.top_logprobs is None else self.token_logprobs(choices),
        )

    def token_logprobs(self, choices: Sequence[TokenChoice]) -> list[TokenLogprob]:
        """``choices`` in OpenAI's terms; special tokens (end of turn, start of text),
        which the reply's text leaves out, are left out here too."""
        return [
            TokenLogprob(
                **self._candidate(choice.token, choice.logprob).model_dump(),
                top_logprobs=[self._candidate(*pair) for pair in choice.top],
            )
            for choice in choices
            if choice.token not in self.textless_ids
        ]

    def finish_reason_of(self, plan: DecodingPlan) -> Callable[[Sequence[int]], FinishReason]:
        """Why a reply with these new ids ended: its end token or a stop text, or its length."""

        def reason(ids: Sequence[int]) -> FinishReason:
            if plan.stops and stop_texts.cut(self.decode(list(ids)), plan.stops)[1]:
                return "stop"
            return self._finish_reason(ids, plan)

        return reason

    def text_of(self, ids: list[int]) -> str:
        """The reply text of new token ids, as every route gives it (no stop texts)."""
        return self.decode(ids).strip()

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence in, one text out
        return text

    def strip(self, row: list[int]) -> list[int]:
        """Cut the padding that follows a finished sequence's end token."""
        end = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
        return row if end is None else row[: end + 1]

    def _candidate(self, token: int, logprob: float) -> TopLogprob:
        raw = token_bytes(self.tokenizer, token)
        return TopLogprob(
            token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw)
        )

    def _finish_reason(self, output: Sequence[int], plan: DecodingPlan) -> FinishReason:
        """ "stop" when the model ended the reply, "length" when the limit did (with
        a forced end token, a reply exactly as long as allowed ended at the limit)."""
        ended = bool(output) and output[-1] in self.eos_ids
        at_limit = len(output) >= plan.max_new_tokens
        return "stop" if ended and not (self.forces_eos and at_limit) else "length"
