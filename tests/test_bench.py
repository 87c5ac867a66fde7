"""The benchmark still runs end to end (on the tiny model: this checks the harness,
not performance; performance numbers come from `make bench` alone)."""

from __future__ import annotations

import json

import pytest
from conftest import BenchRun


@pytest.mark.bench
@pytest.mark.last  # it ran in the background meanwhile (conftest.bench_run)
def test_quick_benchmark_runs_every_server_and_reports_ratios(bench_run: BenchRun):
    run = bench_run.finished.result()
    assert run.returncode == 0, run.stderr[-3000:]
    for workload in ("greedy32-c16", "stream-greedy32-c16"):
        assert f"speedup {workload}: " in run.stdout
    for workload in ("greedy32-c1", "greedy32-c16", "mixed-c16", "open-loop"):
        assert f"continuous/adaptive {workload}: " in run.stdout
    for line in (
        "continuous stream/whole greedy32-c16:",
        "continuous/adaptive open-loop p95 latency:",
        "open-loop p95 time to first token:",
        "overhead greedy32-c1 continuous:",
        "identical replies continuous vs adaptive greedy32-c16: 16 of 16",
        "decode efficiency:",
        "peak RSS baseline",
    ):
        assert line in run.stdout
    (results,) = bench_run.out.glob("*-tiny-quick.json")
    data = json.loads(results.read_text())
    assert {r["server"] for r in data["results"]} == {"continuous", "adaptive", "baseline"}
    assert all(r["failed"] == 0 and r["completed"] > 0 for r in data["results"])
