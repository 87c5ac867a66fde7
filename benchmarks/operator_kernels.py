"""The engine's operators called back from a compiled step: C++ kernels against Python's.

A compiled step (AOTInductor, ``compiled_step``) calls the engine's operators back
through torch's dispatcher: attention (``chatbot::attend_rows``) twice a decoder layer,
and, on CPUs without VNNI, every int8 product (``chatbot::int8_fbgemm``).
``kernels/operators.cpp`` serves them in C++; their Python kernels (``custom_op``) serve
where there is no C++ compiler. This times one conversation's greedy reply in the decode
loop, with the compiled packages attached as the service attaches them, in turns:

- ``cpp``: as served;
- ``python``: the operators' Python kernels registered over the C++ ones for the round
  (then removed, which gives the C++ ones back).

Both must write the same reply (checked); it prints each round's time per token and
``cpp / python``.

    python benchmarks/operator_kernels.py [--model .cache/bench-blenderbot-400m] \
        [--dtype int8] [--tokens 32] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import conversations  # noqa: E402
from benchmarks.profile_step import compiled  # noqa: E402
from benchmarks.quality import checkpoint_of  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.continuous import ContinuousBatcher  # noqa: E402
from chatbot.engine.kernels import attention, int8, native  # noqa: E402
from chatbot.engine.own_thread import in_own_thread  # noqa: E402
from chatbot.schemas import ChatReply, ChatRequest  # noqa: E402


@contextmanager
def python_kernels() -> Iterator[None]:
    """The operators' Python kernels over the C++ ones, meanwhile."""
    library = torch.library.Library("chatbot", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning only once for all operators", UserWarning)
        for operator in (attention.attend_rows, int8.fbgemm_product):
            library.impl(operator._name, operator._init_fn, "CPU")
    try:
        yield
    finally:
        library._destroy()


def timed_reply(batcher: ContinuousBatcher, request: ChatRequest) -> tuple[ChatReply, float]:
    """The reply and its seconds per written token."""

    async def one() -> ChatReply:
        return await batcher.reply(request)

    start = time.perf_counter()
    reply = asyncio.run(one())
    return reply, (time.perf_counter() - start) / reply.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / ".cache/bench-blenderbot-400m"))
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if native.operator("keep_fbgemm") is None:
        raise SystemExit("operators.cpp is not built here (no C++ compiler?): nothing to compare")
    source = checkpoint_of(args.model)
    engine = asyncio.run(in_own_thread(partial(ChatEngine.load, source, "timed", dtype=args.dtype)))
    batcher = ContinuousBatcher(engine, 1, 1)
    request = ChatRequest(
        messages=conversations(1)[0], max_new_tokens=args.tokens, num_beams=1, do_sample=False
    )
    kernels: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "cpp": nullcontext,
        "python": python_kernels,
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    replies: set[str] = set()
    try:
        print(compiled(batcher, str(source), args.dtype))
        for kernel in kernels.values():  # warm: first calls allocate
            with kernel():
                timed_reply(batcher, request)
        for _ in range(args.rounds):
            for name, kernel in kernels.items():
                with kernel():
                    reply, seconds = timed_reply(batcher, request)
                replies.add(reply.reply)
                times[name].append(seconds)
                print(f"{name}: {seconds * 1e3:.2f} ms a token", flush=True)
    finally:
        batcher.close()
    assert len(replies) == 1, f"the kernels wrote different replies: {replies}"
    cpp, python = (statistics.median(times[name]) for name in kernels)
    print(f"{args.dtype}, one conversation, median of {args.rounds} rounds: cpp {cpp * 1e3:.2f} "
          f"ms a token ({1 / cpp:.1f} tokens/s), python {python * 1e3:.2f} ({1 / python:.1f}); "
          f"cpp / python: {cpp / python:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
