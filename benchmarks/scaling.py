"""What one replica takes before another should start: the concurrency to scale on.

Serves the default model (the real 400M Blenderbot architecture, random weights; or
``--model tiny``) with continuous batching and measures, for each number of clients
in a closed loop, greedy 32-token replies per second and their latency. The chosen
concurrency is the smallest at which throughput reaches ``KNEE`` of the best seen:
past it, more clients on one replica add latency and hardly any throughput, so that
is where a second replica should take them (BentoML's ``traffic.concurrency``, KEDA's
threshold in ``deploy/kubernetes``).

Then a surge: Poisson arrivals at half the measured capacity, ``SURGE_LOAD`` times
it, then none, while the decode loop's gauges (``chatbot_num_requests_waiting`` and
``_running``) are sampled from ``/metrics``. The record (``--out``, JSON) is what
``benchmarks/scaler_sim.py`` replays through Kubernetes' autoscaling formula.

    python benchmarks/scaling.py [--model tiny] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import (  # noqa: E402
    GREEDY_32,
    RESULTS,
    Result,
    Workload,
    conversations,
    drive,
    real_architecture_checkpoint,
    running,
    service,
    tiny_checkpoint,
)

KNEE = 0.9  # of the best throughput: the concurrency to scale on reaches this
SURGE_LOAD = 2.5  # the surge's arrival rate, in multiples of one replica's capacity
SURGE_PHASES_S = (20.0, 40.0)  # at half the capacity, then the surge; then no arrivals
SAMPLE_EVERY_S = 0.5
# The surge's queue builds up in the replica, as it would behind a balancer that scales
# on it, instead of being refused past 64 requests at once (CHATBOT_MAX_CONCURRENCY).
UNBOUNDED_QUEUE = {"CHATBOT_MAX_CONCURRENCY": "100000", "CHATBOT_MAX_WAITING": "100000"}
GAUGES = ("chatbot_num_requests_waiting", "chatbot_num_requests_running")


@dataclass(frozen=True)
class Point:
    concurrency: int
    replies_per_s: float
    tokens_per_s: float
    p50_s: float
    p95_s: float

    @classmethod
    def of(cls, concurrency: int, result: Result) -> Point:
        return cls(
            concurrency,
            result.replies_per_s,
            result.tokens_per_s,
            result.percentile(50),
            result.percentile(95),
        )


def knee(points: list[Point]) -> Point:
    """The first point whose throughput reaches ``KNEE`` of the best."""
    best = max(p.replies_per_s for p in points)
    return next(p for p in points if p.replies_per_s >= KNEE * best)


def sweep(url: str, levels: list[int], chats, limit_s: float) -> list[Point]:
    points = []
    for concurrency in levels:
        workload = Workload(f"c{concurrency}", concurrency, max(2 * concurrency, 4), GREEDY_32)
        points.append(Point.of(concurrency, asyncio.run(drive(url, "c", workload, chats, limit_s))))
        print(f"c{concurrency}: {points[-1].replies_per_s:.2f} replies/s", flush=True)
    return points


def gauges(metrics: str) -> dict[str, float]:
    found = {}
    for name in GAUGES:
        match = re.search(rf"^{name}(?:{{[^}}]*}})? ([\d.e+-]+)$", metrics, re.MULTILINE)
        found[name] = float(match.group(1)) if match else 0.0
    return found


def arrival_times(capacity: float, seed: int = 2) -> list[float]:
    """Poisson arrivals: half the capacity, then ``SURGE_LOAD`` times it."""
    draw, times, now = random.Random(seed), [], 0.0
    calm, surge = SURGE_PHASES_S
    for rate, until in ((0.5 * capacity, calm), (SURGE_LOAD * capacity, calm + surge)):
        while (now := now + draw.expovariate(rate)) < until:
            times.append(now)
        now = until
    return times


async def surge(url: str, capacity: float, chats) -> dict:
    """Send the surge and sample the gauges until every reply is in."""
    arrivals, samples, finished = arrival_times(capacity), [], []
    limits = httpx.Limits(max_connections=len(arrivals))
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()

        async def one(index: int, at: float) -> None:
            await asyncio.sleep(at)
            payload = {"messages": chats[index % len(chats)], **GREEDY_32}
            response = await client.post("/respond", json=payload)
            finished.append((time.perf_counter() - start, response.status_code))

        sending = [asyncio.create_task(one(i, at)) for i, at in enumerate(arrivals)]
        while not all(task.done() for task in sending):
            metrics = (await client.get("/metrics")).text
            samples.append({"t": time.perf_counter() - start, **gauges(metrics)})
            await asyncio.sleep(SAMPLE_EVERY_S)
    return {"arrivals": arrivals, "finished": finished, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["real-400m", "tiny"], default="real-400m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer levels, no surge")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    levels = [1, 4, 16, 32] if args.quick else [1, 2, 4, 8, 16, 24, 32, 48, 64, 96]
    checkpoint = real_architecture_checkpoint() if args.model == "real-400m" else tiny_checkpoint()
    chats = conversations(2 * max(levels))
    with tempfile.TemporaryDirectory() as home:
        command, env, url = service(checkpoint, Path(home), max(levels), args.dtype, "continuous")
        env |= UNBOUNDED_QUEUE
        started = time.perf_counter()
        with running(command, env, f"{url}/readyz"):
            ready_s = time.perf_counter() - started
            points = sweep(url, levels, chats, limit_s=600)
            chosen = knee(points)
            record = None if args.quick else asyncio.run(surge(url, chosen.replies_per_s, chats))
    best = max(points, key=lambda p: p.replies_per_s)
    print(f"ready after {ready_s:.1f} s")
    for p in points:
        print(
            f"c{p.concurrency:<3} {p.replies_per_s:6.2f} replies/s {p.tokens_per_s:7.1f} tok/s "
            f"p50 {p.p50_s:5.2f} s p95 {p.p95_s:5.2f} s  {p.replies_per_s / best.replies_per_s:.2f}"
            " of best"
        )
    print(
        f"chosen concurrency: {chosen.concurrency} ({chosen.replies_per_s / best.replies_per_s:.2f}"
        f" of the best throughput, at c{best.concurrency}; p50 {chosen.p50_s:.2f} s against "
        f"{best.p50_s:.2f} s there)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / f"{stamp}-scaling-{args.model}{'-quick' if args.quick else ''}.json"
    out.write_text(
        json.dumps(
            {
                "ready_s": ready_s,
                "points": [p.__dict__ for p in points],
                "chosen": chosen.concurrency,
                "surge": record,
            },
            indent=1,
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
