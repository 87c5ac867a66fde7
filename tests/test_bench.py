"""The benchmark still runs end to end (on the tiny model: this checks the harness,
not performance; performance numbers come from `make bench` alone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BenchRun
from test_engine import PROMPTS, request

from benchmarks.ctranslate2_anchor import Anchor, convert, token_identity
from chatbot.engine.chat_engine import ChatEngine


def test_the_ctranslate2_conversion_writes_what_generate_writes(
    engine: ChatEngine, tiny_checkpoint: Path, tmp_path: Path
):
    """The anchor is only fair if it runs the same model: greedy float32 replies of the
    converted Blenderbot are token for token transformers' (and int8 ones run too)."""
    converted = convert(tiny_checkpoint, tmp_path)
    prompts = [engine.encode(request(p)).input_ids for p in PROMPTS]
    assert token_identity(tiny_checkpoint, converted, prompts, 16) == (len(prompts), len(prompts))
    decoded = Anchor(converted, tiny_checkpoint, "int8").decode(prompts, 4, 16)
    assert [len(ids) for ids in decoded.outputs] == [16] * len(prompts)


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
        "vs ctranslate2-float32 greedy32-c16:",
        "vs ctranslate2-int8 greedy32-c1:",
        "ctranslate2 conversion: 8 of 8 greedy float32 replies token-identical",
        "decode efficiency:",
        "peak RSS baseline",
    ):
        assert line in run.stdout
    (results,) = bench_run.out.glob("*-tiny-quick.json")
    data = json.loads(results.read_text())
    assert {r["server"] for r in data["results"]} == {
        "continuous",
        "adaptive",
        "baseline",
        "ctranslate2 float32",
        "ctranslate2 int8",
    }
    assert all(r["failed"] == 0 and r["completed"] > 0 for r in data["results"])
