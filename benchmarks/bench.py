"""Throughput and latency: the service's two batching modes against the unbatched baseline.

Three servers run the same checkpoint: the service with ``CHATBOT_BATCHING=continuous``
(the decode loop), the service with ``adaptive`` (BentoML's adaptive batching of whole
replies) and the original unbatched design. The checkpoint is a randomly initialised
Blenderbot with exactly the architecture of facebook/blenderbot-400M-distill (364.8 M
parameters, real tokenizer, from ../shared/blenderbot-tokenizer/), so the compute is
the real model's.
Random weights make reply lengths arbitrary, so the checkpoint's generation config
fixes them (min length = max length). Every number is measured in this run; the
``speedup`` lines are ratios of this run's continuous and baseline throughputs, the
``continuous/adaptive`` lines ratios of the two modes.

    python benchmarks/bench.py [--quick] [--model real-400m|tiny] [--dtype auto|bfloat16|...]

On a GPU (picked automatically) ``--dtype auto`` runs bfloat16 (float16 on GPUs
without it); any dtype other than float32 also reports how many greedy replies are
token-identical to float32's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import chitchat_dataset
import httpx
import psutil
import torch
from transformers import BlenderbotTokenizer, GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.timing import wall_seconds  # noqa: E402
from chatbot.engine import precision, precision_names  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.cpu import cpu_flags, cpu_isa, level_of  # noqa: E402
from chatbot.engine.plan import DecodingPlan  # noqa: E402
from chatbot.models.tiny_model import build_model, built_once  # noqa: E402
from chatbot.schemas import ChatRequest  # noqa: E402
from chatbot.settings import DTYPE_CHOICES  # noqa: E402
from devtools.processes import free_port, stop_tree, wait_until_healthy, wait_while_compiling  # noqa: E402

SHARED = ROOT.parent / "shared" / "blenderbot-tokenizer"
CACHE = ROOT / ".cache"
TINY_MODELS = CACHE / "tiny-models"  # the tests' too (``built_once``)
RESULTS = ROOT / "benchmarks" / "results"
GREEDY_32 = {"num_beams": 1, "max_new_tokens": 32}
MODEL_DEFAULT: dict[str, int] = {}  # the checkpoint's own: 10 beams, 59 tokens
ARCHITECTURE_KEYS = [
    "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
    "max_position_embeddings", "activation_function", "dropout", "attention_dropout",
    "activation_dropout", "init_std", "tie_word_embeddings",
]  # fmt: skip


MIXED_LENGTHS = (8, 64)
OPEN_LOOP_LOAD = 0.7  # arrivals at 70% of the adaptive mode's measured capacity


@dataclass(frozen=True)
class Workload:
    """``concurrency`` clients in a closed loop, or (``open_loop``) Poisson arrivals at
    ``OPEN_LOOP_LOAD`` of adaptive's mixed-c32 throughput; ``lengths``: each request's
    ``max_new_tokens`` drawn from this range (fixed seed); ``stream``: OpenAI streaming."""

    name: str
    concurrency: int
    requests: int
    options: dict = field(default_factory=dict)
    lengths: tuple[int, int] | None = None
    stream: bool = False
    open_loop: bool = False
    baseline: bool = True  # the unbatched baseline runs it too
    adaptive: bool = True  # and the adaptive mode

    def payloads(self, chats) -> list[dict]:
        draw = random.Random(0)
        payloads = []
        for i in range(self.requests):
            options = dict(self.options)
            if self.lengths:
                options |= {"num_beams": 1, "max_new_tokens": draw.randint(*self.lengths)}
            payloads.append({"messages": chats[i % len(chats)], **options})
        return payloads


STREAM_32 = Workload("stream-greedy32-c32", 32, 64, GREEDY_32, stream=True, baseline=False)
MIXED_32 = Workload("mixed-c32", 32, 64, lengths=MIXED_LENGTHS, baseline=False)
OPEN_LOOP = Workload(
    "open-loop", 0, 64, lengths=MIXED_LENGTHS, stream=True, open_loop=True, baseline=False
)
FULL = [
    Workload("greedy32-c1", 1, 4, GREEDY_32),
    Workload("greedy32-c8", 8, 16, GREEDY_32),
    Workload("greedy32-c32", 32, 64, GREEDY_32),
    Workload("greedy32-c64", 64, 128, GREEDY_32),
    STREAM_32,
    MIXED_32,
    OPEN_LOOP,
    Workload("default-c1", 1, 2, MODEL_DEFAULT, baseline=False),
    Workload("default-c16", 16, 16, MODEL_DEFAULT, baseline=False),
]
# Under 6 minutes on the 2-core CPU: concurrency 16, and the adaptive mode's slowest
# shape (16 streams, each its own generate) left to the full run.
QUICK = [
    Workload("greedy32-c1", 1, 2, GREEDY_32, baseline=False),
    Workload("greedy32-c16", 16, 16, GREEDY_32),
    Workload("stream-greedy32-c16", 16, 16, GREEDY_32, stream=True, baseline=False, adaptive=False),
    Workload("mixed-c16", 16, 16, lengths=MIXED_LENGTHS, baseline=False),
    replace(OPEN_LOOP, requests=12),
]


@dataclass
class Result:
    server: str
    workload: str
    completed: int
    failed: int
    seconds: float
    latencies: list[float]
    new_tokens: int
    unfinished: int = 0  # still running at the time limit
    first_tokens: list[float] = field(default_factory=list)  # streams: to first text
    replies: list[str] = field(default_factory=list)  # by request: to compare the modes

    @property
    def replies_per_s(self) -> float:
        return self.completed / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    def percentile(self, q: float, first_token: bool = False) -> float:
        """Nearest-rank latency (or time to first token) percentile over every request
        sent; one still running at the time limit counts as infinitely slow."""
        seen = self.first_tokens if first_token else self.latencies
        ranked = sorted(seen) + [math.inf] * self.unfinished
        if not ranked:
            return math.nan
        return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


# --- the model ---------------------------------------------------------------------


def real_architecture_checkpoint() -> Path:
    """Random weights, real 400M architecture and tokenizer; lengths fixed to 59."""
    out = CACHE / "bench-blenderbot-400m"
    if (out / "model.safetensors").exists():
        return out
    config = json.loads((SHARED / "blenderbot-400M-distill.config.json").read_text())
    generation = json.loads((SHARED / "blenderbot-400M-distill.generation_config.json").read_text())
    architecture = {k: config[k] for k in ARCHITECTURE_KEYS}
    model = build_model(config["vocab_size"], architecture)
    model.generation_config = GenerationConfig(
        **{**generation, "min_length": generation["max_length"]}
    )
    tokenizer = BlenderbotTokenizer.from_pretrained(
        SHARED / "blenderbot-400M-distill", model_max_length=128
    )
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def tiny_checkpoint() -> Path:
    return built_once("encoder-decoder", TINY_MODELS)


def conversations(count: int) -> list[list[dict[str, str]]]:
    """Fixed, real chit-chat histories: the last three turns of the first chats."""
    chats = []
    for chat in chitchat_dataset.ConversationDataset():
        turns = [t for t in chat if t.strip()][:5]
        if len(turns) >= 3:
            turns = turns[-3:]
            roles = ["user", "assistant", "user"]
            chats.append([{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)])
        if len(chats) == count:
            return chats
    return chats


# --- measurements in this process --------------------------------------------------


def matmul_peak_gflops(
    device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5
) -> float:
    """Best matmul rate of this machine in the served dtype, the ceiling for decode
    efficiency (a GPU gets a larger matrix: 2048 would not fill it)."""
    size = size * 4 if device.type == "cuda" else size
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = min(wall_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def decode_weights(engine: ChatEngine) -> int:
    """Weights one decode step multiplies per row: the decoder's and the LM head's."""
    config = engine.model.config
    decoder = sum(p.numel() for p in engine.model.get_decoder().parameters())
    return decoder + config.d_model * config.vocab_size


def bare_generate(engine: ChatEngine, chats, options: dict) -> float:
    """Median latency of ``model.generate`` in a plain loop, one conversation at a
    time, over the conversations the concurrency-1 workload sends."""
    requests = [ChatRequest(messages=c, **options) for c in chats]
    engine.generate(requests[:1])  # first-call allocations are not the model's cost
    return statistics.median(wall_seconds(lambda r=r: engine.generate([r])) for r in requests)


def agreement(reference: ChatEngine, engine: ChatEngine, chats) -> dict:
    """How many greedy replies ``engine`` writes token for token as ``reference`` does."""
    requests = [ChatRequest(messages=c, **GREEDY_32) for c in chats]
    expected, got = reference.generate(requests), engine.generate(requests)
    same = sum(a.reply == b.reply for a, b in zip(expected, got, strict=True))
    return {"identical_replies": same, "compared_replies": len(requests)}


def decode_rate(
    engine: ChatEngine, chats, batch_size: int, new_tokens: int, weights_per_row: int
) -> dict:
    """GFLOP/s of full-batch decoding: a ``new_tokens`` run minus a one-token run of
    the same batch leaves the decode steps alone (prefill excluded). FLOPs count the
    decoder's and the LM head's weights (2 per weight per row); attention over the
    cache is left out, so the rate is a lower bound."""
    batch = [engine.encode(ChatRequest(messages=c)).input_ids for c in chats[:batch_size]]

    def run(tokens: int) -> float:
        plan = DecodingPlan(tokens, tokens, 1, False, 1.0, 1.0)
        return wall_seconds(lambda: engine.generate_ids(batch, plan))

    seconds = run(new_tokens) - run(1)
    flops = 2 * weights_per_row * len(batch) * (new_tokens - 1)
    one_token = DecodingPlan(1, 1, 1, False, 1.0, 1.0)
    prefill = statistics.median(
        wall_seconds(lambda ids=ids: engine.generate_ids([ids], one_token)) for ids in batch[:5]
    )
    return {
        "batch_size": len(batch),
        "decode_seconds": seconds,
        "decode_gflops": flops / seconds / 1e9,
        "step_seconds": seconds / (new_tokens - 1),
        "prefill_seconds": prefill,
    }


# --- servers -----------------------------------------------------------------------


class PeakMemory:
    """Samples the resident memory of a process tree in the background."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._stop.set()


@contextmanager
def running(command: list[str], env: dict[str, str], ready_url: str) -> Iterator[PeakMemory]:
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    memory = PeakMemory(process.pid)
    try:
        wait_until_healthy(ready_url, process, timeout_s=600)
        if "service:Chatbot" in command:
            wait_while_compiling(ready_url.removesuffix("/readyz"))
        yield memory
    finally:
        memory.stop()
        # A server still computing cancelled requests may not stop gracefully: the
        # measurements are taken, so it gets 30 s and is then killed.
        stop_tree(process)


def service(
    checkpoint: Path, home: Path, max_batch: int, dtype: str, batching: str
) -> tuple[list[str], dict, str]:
    env = {
        **os.environ, "BENTOML_HOME": str(home), "CHATBOT_MODEL": str(checkpoint),
        "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "True", "CHATBOT_DTYPE": dtype,
        "CHATBOT_BATCHING": batching,
        "CHATBOT_MAX_BATCH_SIZE": str(max_batch), "CHATBOT_MAX_LATENCY_MS": "3600000",
        "CHATBOT_TIMEOUT_S": "3600",
    }  # fmt: skip
    tag = subprocess.run(
        [sys.executable, "import_model.py"], cwd=ROOT, env=env,
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    env["CHATBOT_MODEL_TAG"] = tag
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", "service:Chatbot",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return command, env, f"http://127.0.0.1:{port}"


def baseline(checkpoint: Path, dtype: str) -> tuple[list[str], dict, str]:
    port = free_port()
    env = {
        **os.environ, "CHATBOT_MODEL": str(checkpoint), "HF_HUB_OFFLINE": "1",
        "CHATBOT_DTYPE": dtype,
    }  # fmt: skip
    command = [sys.executable, "-m", "uvicorn", "benchmarks.baseline_server:app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    return command, env, f"http://127.0.0.1:{port}"


# --- load --------------------------------------------------------------------------


class _Client:
    """One request as the workload sends it: ``/respond``, or an OpenAI stream."""

    def __init__(self, client: httpx.AsyncClient, stream: bool) -> None:
        self.client, self.stream = client, stream

    async def send(self, payload: dict) -> tuple[float, float | None, int, str] | None:
        """(latency, time to first text, new tokens, reply), or None when refused."""
        start = time.perf_counter()
        if not self.stream:
            response = await self.client.post("/respond", json=payload)
            if response.status_code != 200:
                return None
            reply = response.json()
            return time.perf_counter() - start, None, reply["completion_tokens"], reply["reply"]
        first, tokens, text = None, 0, []
        request = _openai_stream(payload)
        async with self.client.stream("POST", "/v1/chat/completions", json=request) as response:
            if response.status_code != 200:
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if content := choice["delta"].get("content"):
                        first = first or time.perf_counter() - start
                        text.append(content)
        return time.perf_counter() - start, first, tokens, "".join(text)


def _openai_stream(payload: dict) -> dict:
    return {
        "model": "bench", "messages": payload["messages"], "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0,
        "max_tokens": payload.get("max_new_tokens"), "num_beams": payload.get("num_beams"),
    }  # fmt: skip


async def drive(
    url: str, server: str, workload: Workload, chats, limit_s: float, rate: float | None = None
) -> Result:
    """Send the workload's requests, ``concurrency`` at a time (or at Poisson arrivals
    of ``rate`` per second), for at most ``limit_s`` seconds; requests still running
    then count as not completed."""
    open_loop = workload.open_loop and rate is not None
    semaphore = asyncio.Semaphore(workload.requests if open_loop else workload.concurrency)
    result = Result(server, workload.name, 0, 0, 0.0, [], 0)
    gaps = random.Random(1)
    limits = httpx.Limits(max_connections=workload.requests)
    async with httpx.AsyncClient(base_url=url, timeout=limit_s + 60, limits=limits) as client:
        sender = _Client(client, workload.stream)

        result.replies = [""] * workload.requests

        async def one(index: int, delay_s: float, payload: dict) -> None:
            await asyncio.sleep(delay_s)
            async with semaphore:
                answer = await sender.send(payload)
            if answer is None:
                result.failed += 1
                return
            latency, first, tokens, reply = answer
            result.latencies.append(latency)
            result.first_tokens += [first] if first is not None else []
            result.new_tokens += tokens
            result.replies[index] = reply

        start, arrival = time.perf_counter(), 0.0
        tasks = []
        for index, payload in enumerate(workload.payloads(chats)):
            tasks.append(asyncio.create_task(one(index, arrival, payload)))
            arrival += gaps.expovariate(rate) if open_loop and rate else 0.0
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
        result.seconds = time.perf_counter() - start
    result.completed, result.unfinished = len(result.latencies), len(pending)
    return result


def wait_until_idle(pid: int, limit_s: float = 600) -> None:
    """Cancelled requests keep the server busy; the next workload must not see that."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        # cpu_percent(interval=1) measures over the next second, process by process.
        if sum(p.cpu_percent(interval=1) for p in tree if p.is_running()) < 20:
            return


def open_loop_rate(adaptive: list[Result]) -> float:
    """``OPEN_LOOP_LOAD`` of the adaptive mode's mixed-length throughput."""
    mixed = next(r for r in adaptive if r.workload.startswith("mixed-"))
    return OPEN_LOOP_LOAD * mixed.replies_per_s


MKL_CAPS = {
    "AVX2": "AVX2", "AVX2_VNNI": "AVX2_E1", "AVX2_VNNI_2": "AVX2_E1",
    "AVX512_CORE": "AVX512", "AVX512_CORE_VNNI": "AVX512_E1",
    "AVX512_CORE_BF16": "AVX512_E3", "AVX512_CORE_FP16": "AVX512_E3",
}  # fmt: skip
"""oneDNN's caps below AMX, as MKL names the same instructions (``AVX512_E1``: VNNI;
``E3``: VNNI and BF16; ``E4`` would add AMX)."""


def ctranslate2_isa() -> dict[str, str]:
    """The anchor capped as ``ONEDNN_MAX_CPU_ISA`` caps the service (an older CPU
    emulated): CTranslate2's own kernels by its variable, and its products by MKL's,
    with which it multiplies on Intel CPUs (MKL's plain ``AVX512`` would take VNNI away
    too; on a Xeon with AMX, capped at AVX512_BF16, CTranslate2's int8 did 228.1 and
    224.7 tokens/s at 32 conversations with ``AVX512_E3`` and ``AVX512``, 307.5-328.6
    uncapped)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap not in MKL_CAPS:
        return {}
    own = "AVX2" if cap.startswith("AVX2") else "AVX512"
    return {"CT2_FORCE_CPU_ISA": own, "MKL_ENABLE_INSTRUCTIONS": MKL_CAPS[cap]}


def anchor_result(timing: dict) -> Result:
    """One CTranslate2 batch run as a ``Result``: every request took the whole run."""
    requests, seconds = timing["requests"], timing["seconds"]
    return Result(
        server=f"ctranslate2 {timing['compute_type']}", workload=timing["workload"],
        completed=requests, failed=0, seconds=seconds, latencies=[seconds] * requests,
        new_tokens=timing["new_tokens"],
    )  # fmt: skip


def ctranslate2_anchor(
    checkpoint: Path, workloads: list[Workload], chats, engine: ChatEngine
) -> tuple[list[Result], dict]:
    """CTranslate2 float32 and int8 on the same prompts and lengths, as results of
    servers named ``ctranslate2 <type>`` (``benchmarks/ctranslate2_anchor.py``, in a
    process of its own). Each closed-loop workload of concurrency N is a batch of N:
    what a perfect batcher of N requests could do with its kernels."""
    defaults = engine.defaults
    jobs = [
        {"workload": w.name, "requests": w.requests, "batch_size": w.concurrency,
         "new_tokens": w.options.get("max_new_tokens", defaults.max_new_tokens),
         "beams": w.options.get("num_beams", defaults.num_beams),
         "length_penalty": engine.model.generation_config.length_penalty}
        for w in workloads
        if w.concurrency and not w.stream and not w.lengths
    ]  # fmt: skip
    prompts = [engine.encode(ChatRequest(messages=c)).input_ids for c in chats]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
        json.dump(
            {"checkpoint": str(checkpoint), "cache": str(CACHE), "prompts": prompts,
             "jobs": jobs}, spec,
        )  # fmt: skip
        spec.flush()
        ran = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "ctranslate2_anchor.py"), spec.name],
            capture_output=True, text=True, check=False, env=os.environ | ctranslate2_isa(),
        )  # fmt: skip
    if ran.returncode != 0:
        print(f"ctranslate2 anchor failed, going on without it:\n{ran.stderr[-2000:]}")
        return [], {}
    found = json.loads(ran.stdout.splitlines()[-1])
    results = [anchor_result(timing) for timing in found["timings"]]
    return results, {"identical": found["identical"], "compared": found["compared"]}


def measure(name, spec, workloads, chats, limit_s, rate) -> tuple[list[Result], int]:
    """Run ``workloads`` against one server; ``rate`` is the open loop's arrival rate
    (None: measure adaptive's capacity first, from its mixed-c32 run)."""
    command, env, url = spec
    with running(command, env, f"{url}/readyz") as memory:
        results = []
        for index, workload in enumerate(workloads):
            if index:
                wait_until_idle(memory.process.pid)
            if workload.open_loop and rate is None:
                rate = open_loop_rate(results)
            if workload.open_loop and name == "adaptive":  # its streams are not batched:
                workload = replace(workload, stream=False)  # it answers whole replies
            results.append(asyncio.run(drive(url, name, workload, chats, limit_s, rate)))
        return results, memory.peak


# --- report ------------------------------------------------------------------------


def ratio(a: Result, b: Result) -> str:
    """Throughput ratio a/b, or n/a when either side finished nothing in the limit."""
    if a.completed and b.completed:
        return f"{a.replies_per_s / b.replies_per_s:.2f}"
    return f"n/a ({a.server} {a.completed}, {b.server} {b.completed} replies in the time limit)"


def _latency(result: Result, q: float, first_token: bool = False) -> str:
    value = result.percentile(q, first_token)
    return f"> {result.seconds:.0f}" if value == math.inf else f"{value:.2f}"


def _table(results: list[Result]) -> list[str]:
    lines = [
        "| server | workload | done | failed | replies/s | tokens/s | p50 s | p95 s | p99 s "
        "| p95 first token s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        first = _latency(r, 95, first_token=True) if r.first_tokens else ""
        lines.append(
            f"| {r.server} | {r.workload} | {r.completed} | {r.failed} | "
            f"{r.replies_per_s:.3f} | {r.tokens_per_s:.1f} | {_latency(r, 50)} | "
            f"{_latency(r, 95)} | {_latency(r, 99)} | {first} |"
        )
    return lines


def _comparisons(results: list[Result], bare: dict) -> list[str]:
    """The lines that decide: each mode against the baseline and against each other."""
    by_key = {(r.server, r.workload): r for r in results}
    lines = []
    for r in results:
        if r.server != "continuous":
            continue
        # A stream is compared with the baseline's whole replies of the same shape.
        base = by_key.get(("baseline", r.workload.removeprefix("stream-")))
        if base:
            lines.append(f"speedup {r.workload}: {ratio(r, base)}")
        adaptive = by_key.get(("adaptive", r.workload))
        if adaptive:
            lines.append(f"continuous/adaptive {r.workload}: {ratio(r, adaptive)}")
    for stream in [r for r in results if r.server == "continuous"]:
        whole = by_key.get(("continuous", stream.workload.removeprefix("stream-")))
        if stream.workload.startswith("stream-") and whole:
            lines.append(f"continuous stream/whole {whole.workload}: {ratio(stream, whole)}")
    opened = [by_key.get((s, OPEN_LOOP.name)) for s in ("continuous", "adaptive")]
    if opened[0] and opened[1]:
        p95 = [o.percentile(95) for o in opened]
        bound = bare["prefill_seconds"] + 3 * bare["step_seconds"]
        lines += [
            f"continuous/adaptive open-loop p95 latency: {p95[0] / p95[1]:.2f} "
            f"({p95[0]:.2f} s / {p95[1]:.2f} s)",
            f"open-loop p95 time to first token: {opened[0].percentile(95, True):.2f} s "
            f"(prefill + 3 full-batch decode steps = {bound:.2f} s)",
        ]
    for r in [r for r in results if r.server == "continuous"]:
        for anchor in ("ctranslate2 float32", "ctranslate2 int8"):
            if other := by_key.get((anchor, r.workload)):
                tokens = r.tokens_per_s / other.tokens_per_s
                lines.append(f"vs {anchor.replace(' ', '-')} {r.workload}: {tokens:.2f}")
    for server in ("continuous", "adaptive"):
        if c1 := by_key.get((server, "greedy32-c1")):
            lines.append(
                f"overhead greedy32-c1 {server}: p50 / bare generate = "
                f"{c1.percentile(50) / bare['loop_latency_s']:.3f}"
            )
    for a in [r for r in results if r.server == "continuous" and r.workload.startswith("greedy")]:
        if b := by_key.get(("adaptive", a.workload)):
            pairs = [(x, y) for x, y in zip(a.replies, b.replies, strict=True) if x and y]
            same = sum(x == y for x, y in pairs)
            lines.append(
                f"identical replies continuous vs adaptive {a.workload}: {same} of {len(pairs)}"
            )
    return lines


def report(results: list[Result], peaks: dict[str, int], machine: dict, bare: dict) -> str:
    lines = [
        f"machine: {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, "
        f"{machine['threads']} threads",
        f"model: {machine['model']} on {machine['device']} in {machine['dtype']}"
        f" (CPU kernels: {machine['cpu_isa']})",
        "",
        *_table(results),
        "",
        *(f"peak RSS {name}: {peak / 2**30:.2f} GiB" for name, peak in peaks.items()),
        "",
        f"kernels greedy32-c1: bare generate, stock transformers / this engine = "
        f"{bare['loop_latency_stock_s'] / bare['loop_latency_s']:.2f} "
        f"({bare['loop_latency_stock_s']:.2f} s / {bare['loop_latency_s']:.2f} s)",
        *_comparisons(results, bare),
    ]
    if "ctranslate2_identical" in bare:
        lines.append(
            f"ctranslate2 conversion: {bare['ctranslate2_identical']} of "
            f"{bare['ctranslate2_compared']} greedy float32 replies token-identical to generate"
        )
    if "identical_replies" in bare:
        lines.append(
            f"agreement with float32: {bare['identical_replies']} of "
            f"{bare['compared_replies']} greedy replies token-identical"
        )
    lines.append(
        f"decode efficiency: {bare['decode_gflops']:.1f} GFLOP/s in a batch of "
        f"{bare['batch_size']} / matmul peak {machine['matmul_peak_gflops']:.1f} GFLOP/s = "
        f"{bare['decode_gflops'] / machine['matmul_peak_gflops']:.2f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes, fewer workloads")
    parser.add_argument("--model", choices=["real-400m", "tiny"], default="real-400m")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_CHOICES), default="auto",
        help="precision of every server (auto: bfloat16 on CPUs with native bfloat16, "
        "else float32; bfloat16 or float16 on a GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--workloads", nargs="+", choices=sorted({w.name for w in FULL + QUICK}),
        help="only these (from the full and quick sets), e.g. default-c16 for 10 beams",
    )  # fmt: skip
    args = parser.parse_args()
    workloads = QUICK if args.quick else FULL
    if args.workloads:
        named = {w.name: w for w in FULL + QUICK}
        workloads = [named[name] for name in args.workloads]
    # Quick: long enough for the unbatched baseline to finish 32 greedy replies.
    limit_s = 150.0 if args.quick else 600.0

    checkpoint = real_architecture_checkpoint() if args.model == "real-400m" else tiny_checkpoint()
    chats = conversations(max(w.requests for w in workloads))
    max_batch = max(2, *(w.concurrency for w in workloads))  # BentoML's least
    device = precision.pick_device()
    chosen = precision.resolve(args.dtype, device)
    precision_names.prepare_process(chosen.name)  # as the service does, before any kernel
    # transformers as it comes: float32 nn.Linear on a CPU (any other precision there
    # is one of this project's kernels), the chosen dtype on a GPU.
    stock_dtype = args.dtype if device.type == "cuda" else "float32"
    stock = ChatEngine.load(checkpoint, args.model, pack_weights=False, dtype=stock_dtype)
    parameters = sum(p.numel() for p in stock.model.parameters())
    machine = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": f"{args.model} ({parameters / 1e6:.1f} M parameters)",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": chosen.name,
        "cpu_isa": cpu_isa(),
        "matmul_peak_gflops": matmul_peak_gflops(device, chosen.load_dtype),
    }  # fmt: skip
    weights = decode_weights(stock)
    c1_chats = chats[: workloads[0].requests]  # what the concurrency-1 workload sends
    bare = {"loop_latency_stock_s": bare_generate(stock, c1_chats, GREEDY_32)}
    del stock
    engine = ChatEngine.load(checkpoint, args.model, dtype=args.dtype)
    bare["loop_latency_s"] = bare_generate(engine, c1_chats, GREEDY_32)
    bare |= decode_rate(engine, chats, max_batch, GREEDY_32["max_new_tokens"], weights)
    anchors, identity = ctranslate2_anchor(checkpoint, workloads, chats, engine)
    bare |= {f"ctranslate2_{key}": value for key, value in identity.items()}
    if chosen.name != "float32":
        reference = ChatEngine.load(checkpoint, args.model, dtype="float32")
        bare |= agreement(reference, engine, chats[:16])
        del reference
    del engine

    results: list[Result] = list(anchors)
    peaks: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as home:
        servers = [
            (mode, service(checkpoint, Path(home), max_batch, args.dtype, mode))
            for mode in ("adaptive", "continuous")  # adaptive first: it sets the open loop
        ] + [("baseline", baseline(checkpoint, args.dtype))]
        for name, spec in servers:
            mine = [w for w in workloads if getattr(w, name, True)]  # its flag, if any
            if not mine:
                continue
            opens = any(w.open_loop for w in mine)
            rate = open_loop_rate(results) if name == "continuous" and opens else None
            found, peaks[name] = measure(name, spec, mine, chats, limit_s, rate)
            results += found

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    suffix = "" if chosen.name == "float32" else f"-{chosen.name}"
    if cpu_isa() != level_of(cpu_flags()):  # capped with ONEDNN_MAX_CPU_ISA
        suffix += f"-{cpu_isa()}"
    if args.workloads:
        suffix += "-" + "-".join(args.workloads)
    name = f"{stamp}-{args.model}-{'quick' if args.quick else 'full'}{suffix}"
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "bare": bare,
                "peaks": peaks,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    text = report(results, peaks, machine, bare)
    (args.out / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
