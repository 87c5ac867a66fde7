"""Resident memory under long, varied load: does the service stay flat?

Starts the real service (``bentoml serve``) on small checkpoints of both families: a
tiny Blenderbot with the real tokenizer (from ../shared/blenderbot-tokenizer/; one
trained on chitchat when absent) and a tiny decoder-only chat model. It then sends
mixed traffic at concurrency 64: conversations drawn from chitchat-dataset's words,
1 to 60 words a turn and 0 to 6 earlier turns; greedy, sampled and beam-search
replies, whole and streamed; clients that leave mid-stream; some invalid requests.
After a warm-up and after each ``--every`` requests it waits until everything sent
is answered and the service has had time to release freed memory, then reads the
resident memory of the whole server (every process of it).

    python benchmarks/memory.py [--requests 5000] [--every 1000] [--warm-up 256]
                                [--family blenderbot,decoder-only] [--pack-weights on,off]

Prints a table per run (MiB) with the growth over the run after the first
checkpoint, and writes it to benchmarks/results/. The suite's soak test
(tests/test_reliability.py) drives the same traffic with ``soak``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import chitchat_dataset
import httpx
import psutil
from transformers import BlenderbotTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import (  # noqa: E402
    CACHE,
    RESULTS,
    SHARED,
    TINY_MODELS,
    running,
    service,
    tiny_checkpoint,
)
from chatbot.models.tiny_model import (  # noqa: E402
    TINY_ARCHITECTURE,
    build_model,
    built_once,
)

CONCURRENCY = 64
SETTLE_S = 6.0  # more than the service's CHATBOT_RELEASE_MEMORY_EVERY_S (5 s)
ANSWERED, LEFT, REFUSED = "answered", "left mid-stream", "refused with a 4xx"


@dataclass(frozen=True)
class Call:
    """One request of the soak and what its client does."""

    route: str
    body: dict | bytes
    stream: bool = False
    leaves: bool = False  # the client closes the stream after its first line
    valid: bool = True

    @property
    def expected(self) -> str:
        return LEFT if self.leaves else ANSWERED if self.valid else REFUSED


def chitchat_words(messages: int = 5000) -> list[str]:
    words: list[str] = []
    for conversation in chitchat_dataset.ConversationDataset():
        for message in conversation:
            words += message.split()
            messages -= 1
            if messages == 0:
                return words
    return words


def _conversation(rng: random.Random, words: Sequence[str]) -> list[dict[str, str]]:
    def text() -> str:
        return " ".join(rng.choices(words, k=rng.randint(1, 60)))

    earlier = [
        {"role": role, "content": text()}
        for _ in range(rng.randint(0, 6))
        for role in ("user", "assistant")
    ]
    return [*earlier, {"role": "user", "content": text()}]


INVALID: list[dict | bytes] = [
    b"{not json",
    {"messages": []},
    {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 500},
    {"messages": [{"role": "user", "content": "hi"}], "num_beams": 0},
]


def call(i: int, words: Sequence[str]) -> Call:
    """Request ``i`` of the soak (the same for every run)."""
    rng = random.Random(i)
    messages, draw, length = _conversation(rng, words), rng.random(), rng.randint(1, 32)
    if draw < 0.35:
        return Call("/respond", {"messages": messages, "num_beams": 1, "max_new_tokens": length})
    if draw < 0.50:
        sampled = {"do_sample": True, "temperature": 0.8, "top_p": 0.9}
        return Call("/respond", {"messages": messages, **sampled, "max_new_tokens": length})
    if draw < 0.55:
        beams = {"num_beams": rng.randint(2, 4), "max_new_tokens": min(length, 16)}
        return Call("/respond", {"messages": messages, **beams})
    if draw < 0.62:  # the original route: the model's own decoding (10 beams for Blenderbot)
        said = [m["content"] for m in messages]
        legacy = {"past_user_inputs": said[:-1:2], "generated_responses": said[1::2]}
        return Call("/chat", {"user_input": said[-1], **legacy})
    openai = {"messages": messages, "max_tokens": length, "temperature": rng.choice([0, 0.7])}
    if draw < 0.80:
        return Call("/v1/chat/completions", {**openai, "stream": True}, stream=True)
    if draw < 0.90:
        return Call("/v1/chat/completions", {**openai, "stream": True}, stream=True, leaves=True)
    if draw < 0.95:
        return Call("/v1/chat/completions", openai)
    return Call("/respond", rng.choice(INVALID), valid=False)


async def _send(client: httpx.AsyncClient, c: Call) -> str:
    """What came of ``c``: ``c.expected`` when all went as it should."""
    try:
        if c.stream:
            async with client.stream("POST", c.route, json=c.body) as response:
                if response.status_code != 200:
                    return f"stream got {response.status_code}"
                async for _ in response.aiter_lines():
                    if c.leaves:
                        return LEFT  # leaving the block closes the connection
                return ANSWERED
        if isinstance(c.body, bytes):
            headers = {"content-type": "application/json"}
            response = await client.post(c.route, content=c.body, headers=headers)
        else:
            response = await client.post(c.route, json=c.body)
    except httpx.HTTPError as error:
        return f"connection error {type(error).__name__}"
    code = response.status_code
    if c.valid:
        return ANSWERED if code == 200 else f"valid got {code}"
    return REFUSED if 400 <= code < 500 else f"invalid got {code}"


async def send_all(url: str, calls: Iterable[Call], concurrency: int) -> Counter[str]:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(c: Call) -> str:
            async with semaphore:
                return await _send(client, c)

        return Counter(await asyncio.gather(*(one(c) for c in calls)))


def resident_memory(pid: int) -> int:
    """Of the server's whole process tree, in bytes."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


@dataclass
class Soak:
    """Resident memory (bytes) after ``warm_up`` requests and after each ``every`` more."""

    points: list[tuple[int, int]]  # (requests after the warm-up, bytes)
    outcomes: Counter[str]
    expected: Counter[str]
    seconds: float

    @property
    def growth(self) -> float:
        """Over the run, after its first checkpoint (the issue's measure)."""
        first = self.points[1 if len(self.points) > 2 else 0][1]
        return self.points[-1][1] / first - 1


def soak(
    url: str, pid: int, requests: int, every: int, warm_up: int, concurrency: int = CONCURRENCY
) -> Soak:
    words, start = chitchat_words(), time.perf_counter()
    calls = [call(i, words) for i in range(warm_up + requests)]
    ends = [warm_up, *range(warm_up + every, warm_up + requests + 1, every)]
    outcomes: Counter[str] = Counter()
    points = []
    for begin, end in zip([0, *ends], ends, strict=False):
        outcomes += asyncio.run(send_all(url, calls[begin:end], concurrency))
        time.sleep(SETTLE_S)  # abandoned rows retire; freed memory is released
        points.append((end - warm_up, resident_memory(pid)))
    expected = Counter(c.expected for c in calls[: ends[-1]])
    return Soak(points, outcomes, expected, time.perf_counter() - start)


# --- the benchmark: its own servers -------------------------------------------------


def blenderbot_checkpoint() -> Path:
    """The tiny architecture with the real tokenizer (its 8,008 tokens), when present."""
    real = SHARED / "blenderbot-400M-distill"
    if not (real / "vocab.json").exists():
        return tiny_checkpoint()
    out = CACHE / "memory-tiny-blenderbot-real-tokenizer"
    if not (out / "model.safetensors").exists():
        tokenizer = BlenderbotTokenizer.from_pretrained(real, model_max_length=128)
        tokenizer.save_pretrained(out)
        build_model(len(tokenizer) - 1, TINY_ARCHITECTURE).save_pretrained(out)
    return out


def decoder_only_checkpoint() -> Path:
    return built_once("decoder-only", TINY_MODELS)


CHECKPOINTS = {"blenderbot": blenderbot_checkpoint, "decoder-only": decoder_only_checkpoint}


def measure(family: str, pack: str, args: argparse.Namespace, home: Path) -> Soak:
    command, env, url = service(CHECKPOINTS[family](), home, 8, "float32", "continuous")
    env |= {"CHATBOT_PACK_WEIGHTS": "true" if pack == "on" else "false", "OMP_NUM_THREADS": "1"}
    env |= {"CHATBOT_MAX_CONCURRENCY": "256"}  # admission never refuses the soak's 64
    with running(command, env, f"{url}/readyz") as server:
        return soak(url, server.process.pid, args.requests, args.every, args.warm_up)


def table(rows: dict[str, Soak]) -> list[str]:
    some = next(iter(rows.values()))
    header = [f"{n:,}" for n, _ in some.points]
    lines = [
        "| family, packed weights | " + " | ".join(header) + " | growth after the first |",
        "|---" * (len(header) + 2) + "|",
    ]
    for name, run in rows.items():
        mib = [f"{b / 2**20:,.0f}" for _, b in run.points]
        lines.append(f"| {name} | " + " | ".join(mib) + f" | {run.growth:+.2%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--warm-up", type=int, default=256)
    parser.add_argument("--family", default="blenderbot,decoder-only")
    parser.add_argument("--pack-weights", default="on,off")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    home = CACHE / "memory-bentoml-home"
    rows = {}
    for family in args.family.split(","):
        for pack in args.pack_weights.split(","):
            run = measure(family, pack, args, home)
            rows[f"{family}, {pack}"] = run
            print(f"{family}, packing {pack}: {run.seconds:.0f} s, {dict(run.outcomes)}",
                  flush=True)  # fmt: skip
            if run.outcomes != run.expected:
                print(f"  expected {dict(run.expected)}", flush=True)
    text = "\n".join(
        [
            f"Resident memory (MiB) of the whole server after a {args.warm_up}-request "
            f"warm-up and after each {args.every:,} requests, concurrency {CONCURRENCY}.",
            "",
            *table(rows),
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"{stamp}-memory.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
