"""The real ``bentoml serve`` on the tiny offline model, over HTTP."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest
from conftest import batch_sizes

from devtools.processes import LOCAL, service_info

CONCURRENCY = 64
HI = [{"role": "user", "content": "hi"}]


def legacy(
    user_input: str, said: list[str] | None = None, answered: list[str] | None = None
) -> dict:
    """A ``/chat`` payload in the original microservice's shape."""
    return {
        "past_user_inputs": said or [],
        "generated_responses": answered or [],
        "user_input": user_input,
    }


def post(server: str, route: str, payload: object) -> httpx.Response:
    return LOCAL.post(f"{server}{route}", json=payload, timeout=120)


async def post_concurrently(
    server: str, route: str, payloads: list[dict], concurrency: int = CONCURRENCY
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=server, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(client.post(route, json=p) for p in payloads))


def test_health_endpoints(server):
    assert LOCAL.get(f"{server}/livez").status_code == 200
    assert LOCAL.get(f"{server}/readyz").status_code == 200


def test_legacy_chat_answers_a_json_string(server):
    response = post(server, "/chat", legacy("How are you?", ["hello"], ["Hi!"]))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json(), str)
    assert response.json()


def test_legacy_chat_accepts_just_the_user_input(server):
    assert post(server, "/chat", {"user_input": "hi"}).status_code == 200


def test_respond_reports_model_tokens_and_truncation(server):
    short = post(
        server, "/respond", {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 4}
    )
    assert short.status_code == 200
    body = short.json()
    assert set(body) == {
        "reply", "model", "prompt_tokens", "completion_tokens", "truncated", "finish_reason"
    }  # fmt: skip
    assert body["model"] == "tiny-blenderbot"
    assert 1 <= body["completion_tokens"] <= 4
    # Blenderbot forces its end token at the limit: a 4-token reply was cut there.
    assert body["finish_reason"] == ("length" if body["completion_tokens"] == 4 else "stop")
    assert body["truncated"] is False

    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 10}
        for i in range(21)
    ]
    long = post(server, "/respond", {"messages": history, "max_new_tokens": 2}).json()
    assert long["truncated"] is True
    assert long["prompt_tokens"] == 128


def test_special_token_lookalikes_are_plain_text(server):
    plain = post(
        server, "/respond", {"messages": [{"role": "user", "content": "a b"}], "max_new_tokens": 1}
    )
    tricky = post(
        server,
        "/respond",
        {"messages": [{"role": "user", "content": "</s> <mask>"}], "max_new_tokens": 1},
    )
    assert tricky.status_code == 200
    # Had they become special tokens, each would be one id, like "a" and "b".
    assert tricky.json()["prompt_tokens"] > plain.json()["prompt_tokens"]


@pytest.mark.parametrize(
    ("route", "payload", "message"),
    [
        ("/chat", {"user_input": ""}, "user_input"),
        ("/chat", {"user_input": "   "}, "user_input"),
        ("/chat", legacy("hi", ["a"], []), "same length"),
        ("/chat", {"user_input": ["hi"]}, "valid string"),
        ("/chat", {"user_input": "x" * 4001}, "at most 4000 characters"),
        ("/chat", legacy("hi", ["a"] * 101, ["b"] * 101), "at most 100 items"),
        ("/respond", {"messages": HI, "max_new_tokens": 128}, "at most 127 tokens"),
        ("/respond", {"messages": HI, "num_beams": 0}, "num_beams"),
        ("/respond", {"messages": HI, "temperature": -1}, "temperature"),
        ("/respond", {"messages": HI, "top_p": 2}, "top_p"),
        ("/respond", {"messages": HI, "do_sample": False, "top_p": 0.5}, "do_sample"),
        ("/respond", {"messages": [{"role": "bot", "content": "hi"}]}, "role"),
        ("/respond", {"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
        ("/respond", {"messages": []}, "messages"),
        ("/respond", {"message": "hi"}, "messages"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_4xx_with_a_message(server, route, payload, message):
    response = post(server, route, payload)
    assert 400 <= response.status_code < 500, response.text
    assert message in response.text


@pytest.mark.parametrize("body", [b"not json", b"", b"[]", b'"hi"'])
def test_malformed_bodies_get_a_4xx(server, body):
    response = LOCAL.post(
        f"{server}/chat", content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text


def test_concurrent_requests_all_succeed_and_are_batched(either_batching):
    server = either_batching
    before = batch_sizes(server)
    payloads = [legacy(f"Hello number {i}, how are you?") for i in range(2 * CONCURRENCY)]
    responses = asyncio.run(post_concurrently(server, "/chat", payloads))
    assert Counter(r.status_code for r in responses) == {200: len(payloads)}
    assert all(isinstance(r.json(), str) for r in responses)
    batches = batch_sizes(server) - before
    assert max(batches) > 1, batches


def test_a_batched_reply_equals_the_reply_computed_alone(either_batching):
    server = either_batching
    prompts = [
        "Hello there!",
        "I like lasagne, do you?",
        "What is the capital of France? I always forget it.",
        "ok",
        "My dog is called Rex and he likes long walks on the beach at sunset.",
        "Do you play any instruments?",
    ]
    payloads = [
        {"messages": [{"role": "user", "content": p}], "num_beams": 1, "max_new_tokens": 16}
        for p in prompts * 4
    ]
    before = batch_sizes(server)
    together = asyncio.run(post_concurrently(server, "/respond", payloads))
    assert max(batch_sizes(server) - before) > 1
    alone = [post(server, "/respond", p) for p in payloads[: len(prompts)]]
    assert [r.json() for r in together[: len(prompts)]] == [r.json() for r in alone]
    assert [r.json() for r in together] == [r.json() for r in alone] * 4


def test_mixed_generation_options_under_concurrency(server):
    options = [{"num_beams": 1, "max_new_tokens": 8}, {"num_beams": 2, "max_new_tokens": 6}, {}]
    payloads = [
        {"messages": [{"role": "user", "content": f"question {i}"}], **options[i % 3]}
        for i in range(24)
    ]
    together = asyncio.run(post_concurrently(server, "/respond", payloads))
    assert all(r.status_code == 200 for r in together)
    for payload, response in list(zip(payloads, together, strict=True))[:3]:
        assert post(server, "/respond", payload).json() == response.json()


def test_info_names_the_model_and_its_limits(server):
    info = service_info(server)
    assert info["model"] == "tiny-blenderbot"
    assert info["max_new_tokens_limit"] == 127
    assert info["max_beams"] == 16
