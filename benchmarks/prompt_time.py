"""How long a prompt takes in int4: through the 4-bit kernel, and through the bfloat16
kernel of the same weights that ``Int4Linear`` hands prompts to (CPUs with
AVX512_BF16 or AMX).

A conversation waits for its whole prompt before its first token, and a chat prompt
holds every earlier turn: hundreds of positions. ATen's 4-bit kernel multiplies them
row by row. This loads the model once in int4, and times the prompt pass
(the model's ``forward`` on one prompt, as the decode loop admits it) of each length
both ways, in turns (``kernels.int4.four_bits_throughout`` for the 4-bit way), so the
ratio comes from the same minutes.

    python benchmarks/prompt_time.py [--model SOURCE] [--lengths 50 150 300 600]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality import checkpoint_of  # noqa: E402
from benchmarks.step_variants import load  # noqa: E402
from chatbot.engine import precision, precision_names  # noqa: E402
from chatbot.engine.cpu import at_least  # noqa: E402
from chatbot.engine.kernels.int4 import four_bits_throughout  # noqa: E402
from chatbot.engine.own_thread import in_own_thread  # noqa: E402
from chatbot.models.offline_model import offline_model_path  # noqa: E402

WAYS = {"4-bit kernel": four_bits_throughout, "bfloat16 kernel (served)": nullcontext}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(offline_model_path() or ""))
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 150, 300, 600])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not at_least("avx512_core_bf16"):
        raise SystemExit("no native bfloat16 here (AVX512_BF16, AMX): int4 prompts stay 4-bit")
    chosen = precision.resolve("int4", torch.device("cpu"))
    precision_names.prepare_process(chosen.name)
    model = load(checkpoint_of(args.model), chosen, fuse=True)
    print("int4 prompt pass, median ms of", args.rounds)
    with torch.inference_mode():
        for length in args.lengths:
            ids = torch.randint(100, model.config.vocab_size, (1, length))
            spent: dict[str, list[float]] = {way: [] for way in WAYS}
            for _ in range(args.rounds + 1):  # the first round warms up
                for way, context in WAYS.items():
                    with context():
                        start = time.perf_counter()
                        model(input_ids=ids, logits_to_keep=1)
                        spent[way].append((time.perf_counter() - start) * 1e3)
            four_bit, served = (statistics.median(spent[way][1:]) for way in WAYS)
            print(f"  {length} positions: 4-bit kernel {four_bit:.0f} ms | bfloat16 kernel "
                  f"(served) {served:.0f} ms ({four_bit / served:.2f}x)", flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(in_own_thread(main))  # a thread that ends: one OpenMP team (own_thread)
