"""The benchmark still runs end to end (on the tiny model: this checks the harness,
not performance; performance numbers come from `make bench` alone)."""

from __future__ import annotations

import json

import pytest
from conftest import BenchRun


@pytest.mark.bench
@pytest.mark.last  # it ran in the background meanwhile (conftest.bench_run)
def test_quick_benchmark_runs_both_servers_and_reports_ratios(bench_run: BenchRun):
    run = bench_run.finished.result()
    assert run.returncode == 0, run.stderr[-3000:]
    for workload in ("greedy32-c1", "greedy32-c8", "greedy32-c32"):
        assert f"speedup {workload}: " in run.stdout
    assert "decode efficiency:" in run.stdout
    assert "peak RSS baseline" in run.stdout
    (results,) = bench_run.out.glob("*-tiny-quick.json")
    data = json.loads(results.read_text())
    assert {r["server"] for r in data["results"]} == {"service", "baseline"}
    assert all(r["failed"] == 0 and r["completed"] > 0 for r in data["results"])
