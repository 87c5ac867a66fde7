"""Where one decode step's time goes: a torch profile of the decode loop at one client
(or ``--clients N`` conversations at once).

At one conversation a step multiplies one row by every weight matrix, so its time is
weight bytes read plus a fixed cost per operation (30 layers of SmolLM2, each a dozen
eager torch calls). This runs one greedy reply through the decode loop the service runs
(``ContinuousBatcher``), with torch's profiler on, and prints the time per generated
token and the operations that took most of it, grouped into weights (linear layers),
attention, and everything else. ``--compiled`` first gives the loop's step its compiled
packages as the service does (``compiled_step.attach``, building them into
``CHATBOT_COMPILE_CACHE`` if they are not there yet): the engine's operators that the
packages call back (``chatbot::*``) then show their own cost.

    python benchmarks/profile_step.py [--model SOURCE] [--dtype int4] [--tokens 64] [--compiled]
        [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from functools import partial
from pathlib import Path

from torch._C._profiler import _ExperimentalConfig
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import conversations  # noqa: E402
from benchmarks.quality import checkpoint_of  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.compiled_step import OneRowCompilable, attach  # noqa: E402
from chatbot.engine.continuous import ContinuousBatcher  # noqa: E402
from chatbot.engine.own_thread import in_own_thread  # noqa: E402
from chatbot.models.offline_model import offline_model_path  # noqa: E402
from chatbot.schemas import ChatRequest  # noqa: E402
from chatbot.settings import Settings  # noqa: E402

GROUPS = {
    # The engine's fbgemm operator around fbgemm's own (timed under "weights"): its self
    # time is the cost of calling it, a callback from a compiled package.
    "calling chatbot::int8_fbgemm": ("chatbot::int8_fbgemm",),
    "weights": ("linear", "mm", "addmm", "onednn", "mkldnn", "int4pack", "quantize"),
    "attention": ("attention", "attend", "softmax", "bmm"),
}


def group_of(op: str) -> str:
    name = op.lower()
    return next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), "other")


def reply(batcher: ContinuousBatcher, requests: list[ChatRequest]) -> int:
    """Tokens written for ``requests``, all sent at once to the decode loop."""

    async def together() -> int:
        replies = await asyncio.gather(*(batcher.reply(r) for r in requests))
        return sum(r.completion_tokens for r in replies)

    return asyncio.run(together())


def compiled(batcher: ContinuousBatcher, source: str, dtype: str) -> str:
    """The loop's step with its compiled packages, as the service attaches them: in a
    thread that ends (``own_thread``). Attached in the main thread, whose OpenMP team
    then lived on beside the loop's, a token took 46-49 ms instead of 18 (Blenderbot-400M,
    int8, AMX)."""
    step = batcher.loop.step
    if not isinstance(step, OneRowCompilable):
        raise SystemExit(f"{source}'s step does not compile")
    cache = Path(Settings.from_env().compile_cache)
    attaching = partial(attach, step, source, dtype, True, cache, niceness=0)
    return asyncio.run(in_own_thread(attaching))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(offline_model_path() or ""))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--clients", type=int, default=1, help="conversations at once")
    parser.add_argument("--compiled", action="store_true", help="attach the compiled packages")
    args = parser.parse_args()
    # Loaded as the service loads it, in a thread that ends: a thread that keeps an
    # OpenMP team of its own would slow the decode loop's (chatbot.engine.own_thread).
    source = checkpoint_of(args.model)
    load = partial(ChatEngine.load, source, "profiled", dtype=args.dtype)
    engine = asyncio.run(in_own_thread(load))
    batcher = ContinuousBatcher(engine, args.clients, args.clients)
    try:
        if args.compiled:
            print(compiled(batcher, str(source), args.dtype))
        requests = [
            ChatRequest(messages=chat, max_new_tokens=args.tokens, num_beams=1, do_sample=False)
            for chat in conversations(args.clients)
        ]
        reply(batcher, requests)  # warm: first-call allocations are nobody's step
        start = time.perf_counter()
        tokens = reply(batcher, requests)
        plain = (time.perf_counter() - start) / tokens
        every_thread = _ExperimentalConfig(profile_all_threads=True)  # the loop has its own
        with profile(
            activities=[ProfilerActivity.CPU], experimental_config=every_thread
        ) as profiled:
            reply(batcher, requests)
    finally:
        batcher.close()
    ops = [e for e in profiled.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ops)
    by_group: dict[str, float] = {}
    for e in ops:
        by_group[group_of(e.key)] = by_group.get(group_of(e.key), 0) + e.self_cpu_time_total
    calls = sum(e.count for e in ops) / tokens
    print(f"{args.dtype}: {plain * 1e3:.2f} ms a token unprofiled ({1 / plain:.1f} tokens/s), "
          f"{calls:.0f} profiled operations a token")  # fmt: skip
    for group, spent in sorted(by_group.items(), key=lambda item: -item[1]):
        print(f"  {group}: {spent / total:.0%} ({spent / tokens / 1e3:.2f} ms a token)")
    print("| operation | calls a token | ms a token | share |\n| --- | --- | --- | --- |")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"| {e.key} | {e.count / tokens:.0f} | "
              f"{e.self_cpu_time_total / tokens / 1e3:.3f} | "
              f"{e.self_cpu_time_total / total:.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
