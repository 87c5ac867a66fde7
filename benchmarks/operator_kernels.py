"""The engine's operators called back from a compiled step: C++ kernels against Python's.

A compiled step (AOTInductor, ``compiled_step``) calls the engine's operators back
through torch's dispatcher: attention (``chatbot::attend_rows``) twice a decoder layer,
and, on CPUs without VNNI, every int8 product (``chatbot::int8_fbgemm``).
``kernels/operators.cpp`` serves them in C++; their Python kernels (``custom_op``) serve
where there is no C++ compiler. This times one conversation's greedy reply in the decode
loop (or ``--conversations`` at once), with the compiled packages attached as the
service attaches them, in turns:

- ``cpp``: as served;
- ``python``: the operators' Python kernels registered over the C++ ones for the round
  (then removed, which gives the C++ ones back).

Both must write the same replies (checked); it prints each round's tokens a second and
``cpp / python``.

    python benchmarks/operator_kernels.py [--model .cache/bench-blenderbot-400m] \
        [--dtype int8] [--conversations 1] [--tokens 32] [--rounds 4]
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


def timed_wave(batcher: ContinuousBatcher, requests: list[ChatRequest]) -> tuple[list[str], float]:
    """The replies, sent all at once, and the tokens written a second."""

    async def wave() -> list[ChatReply]:
        return await asyncio.gather(*(batcher.reply(request) for request in requests))

    start = time.perf_counter()
    replies = asyncio.run(wave())
    seconds = time.perf_counter() - start
    return [r.reply for r in replies], sum(r.completion_tokens for r in replies) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / ".cache/bench-blenderbot-400m"))
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--conversations", type=int, default=1, help="at once, in one wave")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if not native.operators():
        raise SystemExit("operators.cpp is not built here (no C++ compiler?): nothing to compare")
    source = checkpoint_of(args.model)
    engine = asyncio.run(in_own_thread(partial(ChatEngine.load, source, "timed", dtype=args.dtype)))
    batcher = ContinuousBatcher(engine, args.conversations, args.conversations)
    requests = [
        ChatRequest(messages=chat, max_new_tokens=args.tokens, num_beams=1, do_sample=False)
        for chat in conversations(args.conversations)
    ]
    kernels: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "cpp": nullcontext,
        "python": python_kernels,
    }
    paces: dict[str, list[float]] = {name: [] for name in kernels}
    written: set[tuple[str, ...]] = set()
    try:
        print(compiled(batcher, str(source), args.dtype))
        for kernel in kernels.values():  # warm: first calls allocate
            with kernel():
                timed_wave(batcher, requests)
        for _ in range(args.rounds):
            for name, kernel in kernels.items():
                with kernel():
                    replies, pace = timed_wave(batcher, requests)
                written.add(tuple(replies))
                paces[name].append(pace)
                print(f"{name}: {pace:.1f} tokens/s", flush=True)
    finally:
        batcher.close()
    assert len(written) == 1, "the kernels wrote different replies"
    cpp, python = (statistics.median(paces[name]) for name in kernels)
    print(f"{args.dtype}, {args.conversations} at once, median of {args.rounds} rounds, tokens/s: "
          f"cpp {cpp:.1f}, python {python:.1f}; cpp / python: {cpp / python:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
