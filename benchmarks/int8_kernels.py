"""int8 through oneDNN and through fbgemm, side by side, in the decode loop.

Both multiply the same 8-bit activations (a scale per row) by the same int8 weights (a
scale per output channel) and sum exactly, so they give the same replies; which one
``Int8Linear`` uses depends on the CPU (``kernels.int8.fbgemm_multiplies``: fbgemm on
CPUs without VNNI). This loads Blenderbot-400M's architecture (random weights, the
bench's checkpoint) once with each, in one process, and times the same greedy replies
through each one's decode loop in turns, ``--rounds`` times, eager steps (no compiled
package): one conversation alone, then 32 at once. It prints tokens/s and the ratio
``fbgemm / onednn`` of each round's best, and whether the replies were identical.

    python benchmarks/int8_kernels.py [--rounds 3] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import GREEDY_32, conversations, real_architecture_checkpoint  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.continuous import ContinuousBatcher  # noqa: E402
from chatbot.engine.kernels import int8  # noqa: E402
from chatbot.engine.own_thread import in_own_thread  # noqa: E402
from chatbot.schemas import ChatRequest  # noqa: E402

KERNELS = ("onednn", "fbgemm")


def load(kernel: str) -> ChatEngine:
    """The bench's model in int8, its products by ``kernel``, loaded in a thread that
    ends, as the service loads it (``own_thread``)."""
    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise SystemExit("this torch has no fbgemm")
    load = partial(ChatEngine.load, real_architecture_checkpoint(), kernel, dtype="int8")
    with mock.patch.object(int8, "fbgemm_multiplies", return_value=kernel == "fbgemm"):
        return asyncio.run(in_own_thread(load))


def wave(engine: ChatEngine, requests: Sequence[ChatRequest]) -> tuple[float, list[str]]:
    """Seconds for ``requests`` at once through a decode loop, and their replies."""

    async def run() -> tuple[float, list[str]]:
        batcher = ContinuousBatcher(engine, len(requests), len(requests))
        try:
            await batcher.reply(requests[0])  # warm: first-call allocations
            start = time.perf_counter()
            replies = await asyncio.gather(*(batcher.reply(r) for r in requests))
            return time.perf_counter() - start, [r.reply for r in replies]
        finally:
            batcher.close()

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    engines = {kernel: load(kernel) for kernel in KERNELS}
    chats = conversations(max(args.concurrency))
    for concurrency in args.concurrency:
        requests = [
            ChatRequest(messages=chat, do_sample=False, **GREEDY_32) for chat in chats[:concurrency]
        ]
        best = dict.fromkeys(KERNELS, float("inf"))
        replies: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for kernel, engine in engines.items():
                seconds, replies[kernel] = wave(engine, requests)
                best[kernel] = min(best[kernel], seconds)
        same = sum(a == b for a, b in zip(*replies.values(), strict=True))
        tokens = concurrency * GREEDY_32["max_new_tokens"]
        for kernel in KERNELS:
            print(f"int8 {kernel} c{concurrency}: {tokens / best[kernel]:.1f} tokens/s")
        print(f"fbgemm / onednn c{concurrency}: {best['onednn'] / best['fbgemm']:.2f} "
              f"({same} of {concurrency} replies identical)")  # fmt: skip


if __name__ == "__main__":
    main()
