"""Two versions of the attention kernel, side by side: a git revision's and the tree's.

``attention_kernel.py`` times the kernel through its operator (about 20 us of Python a
call) against SDPA; a change inside ``attention.c`` is smaller than that noise. This
compiles ``attention.c`` as of ``--against`` (default ``HEAD``) and as it is now, with
the engine's compiler and flags (``native.compile_command``), calls each library's
``attend_rows`` directly, in turns, on the same Blenderbot-400M-shaped rows, and prints
each one's best time per call, ``now / then`` and the largest difference between their
outputs. ``--cached bfloat16`` reads keys and values as int8's cache holds them
(``precision.CACHE``); revisions before that cache (868e36e) take no such argument.

    python benchmarks/attention_versions.py [--against REV] [--rows 32] [--length 53]
        [--cached bfloat16]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatbot.engine.kernels.native import SIGNATURES, compile_command  # noqa: E402

SOURCE = "chatbot/engine/kernels/attention.c"
HEADS, DIM, WIDTH = 32, 40, 128
ROUNDS, CALLS = 15, 50


def built(source: str, folder: Path, name: str) -> ctypes.CDLL:
    """``source`` (C text) compiled as the engine compiles its kernels, and loaded."""
    path = folder / f"{name}.c"
    path.write_text(source)
    library = folder / f"{name}.so"
    common = compile_command()
    if common is None:
        raise SystemExit("no C compiler")
    subprocess.run([*common, "-shared", str(path), "-o", str(library)], check=True)
    loaded = ctypes.CDLL(str(library))
    loaded.attend_rows.argtypes, loaded.attend_rows.restype = SIGNATURES["attend_rows"], None
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=53, help="positions each row reads")
    parser.add_argument("--cached", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    then = subprocess.run(
        ["git", "show", f"{args.against}:{SOURCE}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    threads, n = torch.get_num_threads(), args.rows
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(n, HEADS, 1, DIM, generator=generator)
    cached = getattr(torch, args.cached)
    keys, values = torch.randn(2, n, HEADS, WIDTH, DIM, generator=generator).to(cached).unbind()
    rows, lengths = torch.arange(n), torch.full((n,), args.length)
    scratch = torch.empty(threads * WIDTH)

    def call(library: ctypes.CDLL) -> torch.Tensor:
        out = torch.empty(n, HEADS, 1, DIM)
        library.attend_rows(
            query.data_ptr(), query.stride(0), query.stride(1), keys.data_ptr(), values.data_ptr(),
            cached == torch.bfloat16, keys.stride(0), keys.stride(1), keys.stride(2),
            rows.data_ptr(), lengths.data_ptr(), n, HEADS, 1, DIM,
            DIM**-0.5, out.data_ptr(), threads, scratch.data_ptr(), WIDTH,
        )  # fmt: skip
        return out

    with tempfile.TemporaryDirectory() as folder:
        versions = {
            args.against: built(then, Path(folder), "then"),
            "now": built((ROOT / SOURCE).read_text(), Path(folder), "now"),
        }
        best = dict.fromkeys(versions, float("inf"))
        outputs = {}
        for _ in range(ROUNDS):
            for name, library in versions.items():
                outputs[name] = call(library)
                began = time.perf_counter()
                for _ in range(CALLS):
                    call(library)
                best[name] = min(best[name], (time.perf_counter() - began) / CALLS)
    print(f"{n} rows x {args.length} positions, {HEADS} heads of {DIM}, {args.cached} keys "
          f"and values, {threads} threads:")  # fmt: skip
    for name, seconds in best.items():
        print(f"  {name:12s} {seconds * 1e3:.3f} ms a call")
    difference = (outputs["now"] - outputs[args.against]).abs().max().item()
    print(f"now / {args.against}: {best['now'] / best[args.against]:.2f}; "
          f"largest difference {difference:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
