"""How the queue-depth autoscaler (deploy/kubernetes/keda) answers a recorded surge.

Replays the arrivals that ``benchmarks/scaling.py`` sent one replica through
Kubernetes' autoscaling rules, as KEDA's Prometheus trigger drives them:

- every ``SCRAPE_S`` Prometheus reads the replicas' ``chatbot_num_requests_running``
  + ``_waiting``; every ``SYNC_S`` the HorizontalPodAutoscaler asks for
  ``ceil(total / threshold)`` replicas (an ``AverageValue`` metric), unless that is
  within 10% of the current count (its tolerance), between the ScaledObject's
  minimum and maximum, at most doubling (or +4) a period;
- a new replica serves once the model has loaded: the record's measured start, plus
  ``--pull-s`` for the image and the pod's scheduling (0 by default: say yours);
- scaling down takes the highest recommendation of the last 300 s (the stabilization
  window in scaledobject.yaml).

Each ready replica answers at the throughput the record measured at its share of the
conversations (its closed-loop sweep, interpolated): a fluid model, checked against
the record itself by replaying the surge on one replica without scaling, where the
queue was measured. Prints the figures and draws ``docs/scaling.png``.

    python benchmarks/scaler_sim.py [RECORD.json] [--pull-s 30]
"""

from __future__ import annotations

import argparse
import json
import math
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "scaling.png"
STEP_S = 0.25
SCRAPE_S = 15.0  # Prometheus' default scrape interval
SYNC_S = 15.0  # the HorizontalPodAutoscaler's sync period (and the ScaledObject's polling)
TOLERANCE = 0.1
DOWN_WINDOW_S = 300.0
MIN_REPLICAS, MAX_REPLICAS = 2, 8  # deploy/kubernetes/keda/scaledobject.yaml


@dataclass
class Capacity:
    """Replies per second of one replica with ``c`` conversations, from the sweep."""

    concurrency: list[float]
    replies_per_s: list[float]

    def at(self, c: float) -> float:
        if c <= 0:
            return 0.0
        xs, ys = [0.0, *self.concurrency], [0.0, *self.replies_per_s]
        if c >= xs[-1]:
            return ys[-1]
        i = bisect_right(xs, c)
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (c - xs[i - 1]) / (xs[i] - xs[i - 1])


@dataclass
class Timeline:
    t: list[float] = field(default_factory=list)
    in_system: list[float] = field(default_factory=list)  # conversations, all replicas
    ready: list[int] = field(default_factory=list)
    wanted: list[int] = field(default_factory=list)

    @property
    def per_replica(self) -> list[float]:
        return [q / r for q, r in zip(self.in_system, self.ready, strict=True)]


def hpa_step(current: int, total: float, threshold: float) -> int:
    """One HorizontalPodAutoscaler decision for an AverageValue metric."""
    if abs(total / (current * threshold) - 1) <= TOLERANCE:
        return current
    wanted = math.ceil(total / threshold)
    wanted = min(wanted, max(2 * current, current + 4))  # the default scale-up policy
    return max(MIN_REPLICAS, min(MAX_REPLICAS, wanted))


def simulate(
    arrivals: list[float], capacity: Capacity, threshold: float, start_s: float,
    until_s: float, scaling: bool = True, replicas: int = MIN_REPLICAS,
) -> Timeline:  # fmt: skip
    """The fluid replay: conversations in the system, replicas ready and wanted."""
    timeline, queue, scraped = Timeline(), 0.0, 0.0
    starting: list[float] = []  # when each replica being started will be ready
    ready, wanted, history = replicas, replicas, list[tuple[float, int]]()
    next_arrival, t = 0, 0.0
    while t < until_s:
        while next_arrival < len(arrivals) and arrivals[next_arrival] < t + STEP_S:
            queue, next_arrival = queue + 1, next_arrival + 1
        served = ready * capacity.at(queue / ready) * STEP_S
        queue = max(0.0, queue - served)
        if t % SCRAPE_S < STEP_S:
            scraped = queue
        if scaling and t % SYNC_S < STEP_S and t > 0:
            history.append((t, hpa_step(wanted, scraped, threshold)))
            recent = [w for when, w in history if when > t - DOWN_WINDOW_S]
            target = history[-1][1] if history[-1][1] > wanted else max(recent)
            starting += [t + start_s] * max(0, target - wanted)
            if target < wanted:  # the newest go first; a starting one is dropped first
                drop = wanted - target
                while drop and starting:
                    starting.pop()
                    drop -= 1
                ready -= drop
            wanted = target
        ready += sum(1 for when in starting if when <= t)
        starting = [when for when in starting if when > t]
        for series, value in zip(
            (timeline.t, timeline.in_system, timeline.ready, timeline.wanted),
            (t, queue, ready, wanted),
            strict=True,
        ):
            series.append(value)
        t += STEP_S
    return timeline


def measured_in_system(record: dict) -> list[float]:
    """Conversations the recorded replica held at each sample (running + waiting)."""
    return [s["chatbot_num_requests_waiting"] + s["chatbot_num_requests_running"]
            for s in record["surge"]["samples"]]  # fmt: skip


def draw(record: dict, single: Timeline, scaled: Timeline, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = record["surge"]["samples"]
    measured = measured_in_system(record)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot([s["t"] for s in samples], measured, label="1 replica, measured", color="grey")
    top.plot(single.t, single.in_system, "--", label="1 replica, replayed", color="black")
    top.plot(scaled.t, scaled.per_replica, label="per replica, autoscaled", color="tab:blue")
    top.axhline(threshold, color="tab:red", linewidth=0.8, label=f"threshold ({threshold:g})")
    top.set_ylabel("conversations in a replica")
    top.legend(loc="upper right", fontsize=8)
    bottom.step(scaled.t, scaled.wanted, where="post", label="wanted", color="tab:orange")
    bottom.step(scaled.t, scaled.ready, where="post", label="ready", color="tab:blue")
    bottom.set_ylabel("replicas")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right", fontsize=8)
    figure.suptitle("A recorded surge through KEDA's queue-depth autoscaling")
    figure.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    figure.savefig(PLOT, dpi=110)


def latest_record() -> Path:
    records = sorted(RESULTS.glob("*-scaling-real-400m.json"))
    if not records:
        raise SystemExit("no record: run benchmarks/scaling.py (make bench-scaling) first")
    return records[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", nargs="?", type=Path, help="benchmarks/scaling.py's JSON")
    parser.add_argument("--pull-s", type=float, default=0.0, help="added to each start")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    path = args.record or latest_record()
    record = json.loads(path.read_text())
    points = record["points"]
    capacity = Capacity([p["concurrency"] for p in points], [p["replies_per_s"] for p in points])
    threshold, start_s = float(record["chosen"]), record["ready_s"] + args.pull_s
    arrivals = record["surge"]["arrivals"]
    until = record["surge"]["samples"][-1]["t"] + DOWN_WINDOW_S + 60  # to see it scale down
    single = simulate(arrivals, capacity, threshold, start_s, until, scaling=False, replicas=1)
    scaled = simulate(arrivals, capacity, threshold, start_s, until)
    measured_peak = max(measured_in_system(record))
    print(f"record {path.name}: {len(arrivals)} arrivals, threshold {threshold:g}, "
          f"a replica ready {start_s:.1f} s after it is asked for")  # fmt: skip
    print(f"1 replica: peak {measured_peak:.0f} conversations measured, "
          f"{max(single.in_system):.0f} replayed")  # fmt: skip
    print(f"autoscaled: peak {max(scaled.per_replica):.0f} a replica, up to "
          f"{max(scaled.ready)} ready ({max(scaled.wanted)} wanted), back to "
          f"{scaled.ready[-1]} at {scaled.t[-1]:.0f} s")  # fmt: skip
    changes = [(t, r) for i, (t, r) in enumerate(zip(scaled.t, scaled.ready, strict=True))
               if i == 0 or r != scaled.ready[i - 1]]  # fmt: skip
    print("ready replicas over time: " + ", ".join(f"{t:.0f} s: {r}" for t, r in changes))
    if not args.no_plot:
        draw(record, single, scaled, threshold)
        print(f"drawn to {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
