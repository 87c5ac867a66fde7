"""Fuzzing the real server from its own OpenAPI spec (schemathesis): no request the
spec allows, or nearly allows, gets a 5xx or an answer that breaks the spec.

schemathesis' pytest plugin does not run under pytest 9 yet, so the operations'
Hypothesis strategies are used directly; every operation in the spec is fuzzed.

All of schemathesis' checks run but one: "schema-valid data must be accepted". Some
rules cannot be written in OpenAPI 3.0 (the two legacy history lists must pair up, the
last message must be the user's, a model's own token limit); requests that break them
are refused with a 400 and a message, which the other checks do verify.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from devtools.processes import LOCAL

# 50 cases per operation and mode (100 until the suite outgrew CI's 10 minutes): the
# positive /v1/completions cases alone took 32 s, each a real reply. Boundary values
# are schemathesis' coverage phase's (the last test here), not left to chance.
EXAMPLES_PER_OPERATION = 50
FUZZED = [
    "GET /healthz", "GET /livez", "GET /metrics", "GET /readyz",
    "GET /v1/models", "POST /chat", "POST /generate", "POST /info", "POST /respond",
    "POST /v1/chat/completions", "POST /v1/completions",
]  # fmt: skip


# Admission refuses over-long bodies with 413 (documented in the spec), which
# schemathesis does not count as a rejection unless told.
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "413", "422"]}}}


@pytest.fixture(scope="module")
def api_schema(server: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(CONFIG)
    return schemathesis.openapi.from_url(f"{server}/docs.json", config=config)


def test_every_operation_in_the_spec_is_fuzzed(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert sorted(f"{op.method.upper()} {op.path}" for op in operations) == FUZZED


@pytest.mark.parametrize(
    ("operation", "mode"),
    [(op, GenerationMode.POSITIVE) for op in FUZZED]
    + [(op, GenerationMode.NEGATIVE) for op in FUZZED if op.startswith("POST")],
)
def test_the_api_honours_its_own_spec(api_schema, operation: str, mode: GenerationMode):
    """Positive: payloads the spec allows; negative: payloads that break it (only
    for the POST routes: the GET routes take no input to break)."""
    method, path = operation.split()
    calls: list[int] = []

    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        # Derandomized: the same cases every CI run, so a failure is always reproducible.
        max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )  # fmt: skip
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call_and_validate(timeout=120, excluded_checks=[positive_data_acceptance])
        calls.append(response.status_code)

    fuzz()
    print(f"\n{operation} {mode.value}: {len(calls)} cases, statuses {sorted(set(calls))}")
    assert calls


def test_schemathesis_own_coverage_run_passes_every_check(server: str, tmp_path: Path):
    """schemathesis' own runner, its coverage phase: boundary values, missing fields,
    and bodies the routes cannot read (multipart/form-data without a boundary,
    text/plain), each held to every check, the content-type ones included."""
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server}/docs.json",
         "--phases=coverage", "--checks=all", "--exclude-checks=positive_data_acceptance",
         "--seed=1", "--max-failures=10"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,  # where it keeps its cache
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:]
    assert " failed" not in run.stdout.split("SUMMARY")[-1]


def test_the_spec_lists_what_admission_answers(server: str):
    spec = LOCAL.get(f"{server}/docs.json", timeout=30).json()
    responses = spec["paths"]["/respond"]["post"]["responses"]
    assert {"200", "400", "401", "413", "503", "504"} <= set(responses)
    assert "Retry-After" in responses["503"]["description"]
