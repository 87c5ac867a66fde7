"""Continuous batching in the real ``bentoml serve`` (the default CHATBOT_BATCHING)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
from conftest import histogram

from devtools.processes import LOCAL, service_metrics

LONG = {"num_beams": 4, "max_new_tokens": 127}
VLLM_NAMES = [
    "chatbot_time_to_first_token_seconds_bucket",
    "chatbot_inter_token_latency_seconds_bucket",
    "chatbot_request_queue_time_seconds_bucket",
    "chatbot_e2e_request_latency_seconds_bucket",
    "chatbot_num_requests_running",
    "chatbot_num_requests_waiting",
    "chatbot_rows_per_step_bucket",
    "chatbot_prompt_tokens_total",
    "chatbot_generation_tokens_total",
]


def ask(text: str, **options: object) -> dict:
    return {"messages": [{"role": "user", "content": text}], **options}


def gauge(server: str, name: str) -> float:
    metrics = service_metrics(server)
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([\d.]+)$", metrics, re.M))


async def wait_running(server: str, at_least: int) -> None:
    for _ in range(400):
        if gauge(server, "chatbot_num_requests_running") >= at_least:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"fewer than {at_least} replies ever ran at once")


def test_a_short_request_is_answered_before_a_running_batch_ends(server):
    async def scenario() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:

            async def finished_at(payload: dict) -> float:
                response = await client.post("/respond", json=payload)
                assert response.status_code == 200, response.text
                return time.perf_counter()

            long = [asyncio.create_task(finished_at(ask(f"Story {i}", **LONG))) for i in range(8)]
            await wait_running(server, 8)
            short = await finished_at(ask("hi", num_beams=1, max_new_tokens=2))
            return short, list(await asyncio.gather(*long))

    short, long = asyncio.run(scenario())
    assert short < min(long)


def test_concurrent_streams_share_decode_steps(server):
    async def stream(client: httpx.AsyncClient, i: int) -> str:
        payload = {
            "model": "any", "stream": True, "max_tokens": 60, "temperature": 0,
            "messages": [{"role": "user", "content": f"Stream number {i}"}],
        }  # fmt: skip
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            assert response.status_code == 200
            return "".join([line async for line in response.aiter_lines()])

    async def sixteen() -> list[str]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(16)))

    before = histogram(server, "chatbot_rows_per_step")
    bodies = asyncio.run(sixteen())
    steps = histogram(server, "chatbot_rows_per_step") - before
    assert all(body.endswith("data: [DONE]") for body in bodies)
    assert sum(count for rows, count in steps.items() if rows >= 16) > 0, steps


def test_metrics_use_the_names_operators_know_from_vllm(server):
    LOCAL.post(f"{server}/respond", json=ask("hello", num_beams=1, max_new_tokens=3), timeout=60)
    metrics = service_metrics(server)
    assert [name for name in VLLM_NAMES if name not in metrics] == []


def test_a_full_queue_answers_503_with_retry_after(small_loop):
    """Two rows, one waiting place: of six 2-beam replies at once, most are refused."""

    async def six() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_loop, timeout=120) as client:
            payload = ask("tell me a story", num_beams=2, max_new_tokens=120)
            return await asyncio.gather(*(client.post("/respond", json=payload) for _ in range(6)))

    responses = asyncio.run(six())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["Retry-After"]) >= 1
    assert "busy" in refused.json()["error"]


def test_more_beams_than_rows_is_a_400(small_loop):
    response = LOCAL.post(f"{small_loop}/respond", json=ask("hi", num_beams=3), timeout=60)
    assert response.status_code == 400
    assert "CHATBOT_MAX_ROWS" in response.text
