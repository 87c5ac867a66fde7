"""The exact bytes of one token, for log-probabilities in OpenAI's shape.

Decoding a single token id loses bytes whenever a character spans two tokens (an
emoji, most CJK text): each half decodes to U+FFFD. Byte-level BPE tokenizers
(GPT-2's scheme, used by Blenderbot, SmolLM2, Llama 3, Qwen...) spell every token
with one printable character per byte, so the token's own spelling maps back to
its bytes; other tokenizers fall back to the decoded text.
"""

from __future__ import annotations

from functools import cache

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode


@cache
def _byte_of() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: PreTrainedTokenizerBase, token: int) -> bytes:
    spelling = tokenizer.convert_ids_to_tokens(token)
    byte_of = _byte_of()
    if isinstance(spelling, str) and spelling and all(char in byte_of for char in spelling):
        return bytes(byte_of[char] for char in spelling)
    text = tokenizer.decode([token])
    assert isinstance(text, str)  # one sequence in, one text out
    return text.encode("utf-8")
