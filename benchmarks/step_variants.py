"""One decode step's time in each variant of the engine, measured side by side.

A step's cost at a few rows is mostly fixed costs (calls, threads meeting, the model's
Python), which a served benchmark measures through a lot of noise. This loads the model
once per variant in one process, fills each variant's rows with the same prompts, and
times ``decode`` in turns (variant after variant, ``--rounds`` times), so that the
ratios against the baseline come from the same minutes of the same machine:

* ``baseline``: the model's own ``forward`` (``DecoderOnlyStep``), one product per
  projection, the LM head the precision had before (``--baseline-head``);
* ``stacked``: projections of one input in one product (``kernels.fused``);
* ``stacked + llama step``: and the hand-written step (``LlamaStep``);
* ``stacked + llama step + head``: and the precision's own head, as served.

    python benchmarks/step_variants.py [--model SOURCE] [--dtype int4] [--rows 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import conversations  # noqa: E402
from benchmarks.quality import checkpoint_of  # noqa: E402
from chatbot.engine import kernels, precision, precision_names  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.llama_step import LlamaStep  # noqa: E402
from chatbot.engine.model_step import DecoderOnlyStep, ModelStep  # noqa: E402
from chatbot.engine.own_thread import in_own_thread  # noqa: E402
from chatbot.models.offline_model import offline_model_path  # noqa: E402
from chatbot.schemas import ChatRequest  # noqa: E402


def load(path: Path, chosen: precision.Precision, fuse: bool) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=chosen.load_dtype).eval()
    precision.apply(model, chosen, pack_weights=True, fuse=fuse)
    return model


def filled(step: ModelStep, prompts: list[list[int]]) -> ModelStep:
    step.admit(prompts, list(range(len(prompts))), [1] * len(prompts))
    return step


def time_steps(
    steps: dict[str, ModelStep], prompts: list[list[int]], rounds: int
) -> dict[str, float]:
    """Median ms of one ``decode`` of a row per prompt (each at its next position),
    per variant, timed in turns."""
    rows = len(prompts)
    tokens, positions = torch.full((rows,), 200), torch.tensor([len(p) for p in prompts])
    times: dict[str, list[float]] = {name: [] for name in steps}
    with torch.inference_mode():
        for step in steps.values():
            step.decode(tokens, positions, [1] * rows)  # warm
        for _ in range(rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(5):
                    step.decode(tokens, positions, [1] * rows)
                times[name].append((time.perf_counter() - start) / 5 * 1e3)
    return {name: statistics.median(spent) for name, spent in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(offline_model_path() or ""))
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--baseline-head", default="RescoredBFloat16Linear")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    path = checkpoint_of(args.model)
    served = precision.resolve(args.dtype, torch.device("cpu"))
    baseline = replace(served, head=getattr(kernels, args.baseline_head))
    # The baseline as it was served (bfloat16: no AMX).
    precision_names.prepare_process(baseline.name)
    engine = ChatEngine.load(path, "prompts", dtype="float32", pack_weights=False)
    chats = conversations(max(args.rows))
    prompts = [list(engine.encode(ChatRequest(messages=chat)).input_ids) for chat in chats]
    models = {
        "baseline": (load(path, baseline, fuse=False), DecoderOnlyStep),
        "stacked": (load(path, baseline, fuse=True), DecoderOnlyStep),
        "stacked + llama step": (load(path, baseline, fuse=True), LlamaStep),
        "stacked + llama step + head": (load(path, served, fuse=True), LlamaStep),
    }
    head = served.head.__name__ if served.head else "float32"
    print(f"{args.dtype} (served head {head}; baseline head {args.baseline_head}): "
          f"ms a decode step, median of {args.rounds}")  # fmt: skip
    for rows in args.rows:
        steps = {name: filled(kind(model, positions=1024), prompts[:rows])
                 for name, (model, kind) in models.items()}  # fmt: skip
        spent = time_steps(steps, prompts[:rows], args.rounds)
        base = spent["baseline"]
        cells = [f"{name} {ms:.1f} ({base / ms:.2f}x)" for name, ms in spent.items()]
        print(f"  {rows} rows: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    asyncio.run(in_own_thread(main))  # a thread that ends: one OpenMP team (own_thread)
