"""The one-row step compiled ahead of time (``chatbot.engine.compiled_step``) against
the eager ``LlamaStep``, for one conversation (SmolLM2 in int4, as the offline model is
served): how long the package takes to build and to load, whether greedy replies'
logits stay bit-identical to the eager step's, and the step's time in turns.

    python benchmarks/aoti_probe.py [--model SOURCE] [--dtype int4] [--steps 48]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import conversations  # noqa: E402
from benchmarks.quality import checkpoint_of  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.compiled_step import attach  # noqa: E402
from chatbot.engine.model_step import ModelStep, OneRowCompilable  # noqa: E402
from chatbot.engine.own_thread import in_own_thread  # noqa: E402
from chatbot.models.offline_model import offline_model_path  # noqa: E402
from chatbot.schemas import ChatRequest  # noqa: E402


def greedy(
    step: ModelStep, prompt: list[int], start: int, steps: int
) -> tuple[list[torch.Tensor], int]:
    """One reply alone, greedy: every step's (1, vocab) logits, and the next position.
    An encoder-decoder's reply starts at its own position 0, with ``start``."""
    with torch.inference_mode():
        step.reserve(1)
        first = step.admit([prompt], [0], [1])
        position = torch.tensor([len(prompt)])
        if first is None:
            position = torch.tensor([1])
            first = step.decode(torch.tensor([start]), torch.tensor([0]), [1])
        logits = [first]
        for _ in range(steps):
            logits.append(step.decode(logits[-1].argmax(-1), position, [1]))
            position = position + 1
    return logits, int(position)


def step_ms(step: ModelStep, position: int, rounds: int) -> list[float]:
    """Each round's mean time of 10 steps at ``position`` (the cache filled before it)."""
    token, at, times = torch.tensor([200]), torch.tensor([position]), []
    with torch.inference_mode():
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(10):
                step.decode(token, at, [1])
            times.append((time.perf_counter() - started) / 10 * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(offline_model_path() or ""))
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    path = checkpoint_of(args.model)
    engine = ChatEngine.load(path, "probe", dtype=args.dtype)
    prompt = list(engine.encode(ChatRequest(messages=conversations(1)[0])).input_ids)
    # Two models: attaching gives the model's LM head its compiled product too.
    eager = ChatEngine.load(path, "probe", dtype=args.dtype).model_step()
    compiled = engine.model_step()
    assert isinstance(compiled, OneRowCompilable), f"{args.model}'s step does not compile"
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        print(attach(compiled, path, args.dtype, True, Path(cache)), flush=True)
        built = time.perf_counter()
        print(attach(compiled, path, args.dtype, True, Path(cache)), flush=True)
        print(f"built and verified in {built - started:.1f} s, "
              f"loaded and verified in {time.perf_counter() - built:.2f} s")  # fmt: skip
    start = engine.model.generation_config.decoder_start_token_id or 0  # encoder-decoders only
    own, filled = greedy(eager, prompt, start, args.steps)
    fast, _ = greedy(compiled, prompt, start, args.steps)
    same = sum(map(torch.equal, own, fast))
    print(f"{same} of {len(own)} greedy steps' logits bit-identical to the eager step's")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):  # in turns, so that the machine's drift hits both
        times["eager"] += step_ms(eager, filled, 1)
        times["compiled"] += step_ms(compiled, filled, 1)
    slow, quick = (statistics.median(t) for t in times.values())
    print(f"one row: eager step {slow:.2f} ms, compiled {quick:.2f} ms ({slow / quick:.2f}x)")


if __name__ == "__main__":
    asyncio.run(in_own_thread(main))  # a thread that ends: one OpenMP team (own_thread)
