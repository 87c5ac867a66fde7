"""The OpenAI-compatible routes, driven by the official ``openai`` client against the
real server: whole and streamed replies, batching, errors, and both model families."""

from __future__ import annotations

import asyncio

import openai
import pytest
from conftest import Served, batch_sizes

from devtools.processes import LOCAL, service_info


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def respond(url: str, text: str, **options) -> dict:
    payload = {"messages": [{"role": "user", "content": text}], **options}
    response = LOCAL.post(f"{url}/respond", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def model_id(client: openai.OpenAI) -> str:
    (model,) = client.models.list().data
    return model.id


@pytest.fixture(params=["blenderbot", "decoder-only"])
def url(request: pytest.FixtureRequest, served: Served, chat_model: Served) -> str:
    return served.url if request.param == "blenderbot" else chat_model.url


def test_models_lists_the_served_model(url):
    info = service_info(url)
    assert model_id(client_for(url)) == info["model"]


def test_any_model_name_is_answered_by_the_served_model_which_the_answer_names(server):
    client = client_for(server)
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert completion.model == model_id(client)


def test_a_whole_reply_matches_respond(url):
    client = client_for(url)
    completion = client.chat.completions.create(
        model=model_id(client), messages=[{"role": "user", "content": "Hello, how are you?"}],
        max_tokens=10, temperature=0,
    )  # fmt: skip
    expected = respond(url, "Hello, how are you?", max_new_tokens=10, do_sample=False)
    (choice,) = completion.choices
    assert completion.object == "chat.completion"
    assert (choice.message.role, choice.message.content) == ("assistant", expected["reply"])
    assert choice.finish_reason == expected["finish_reason"]
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        expected["prompt_tokens"], expected["completion_tokens"],
        expected["prompt_tokens"] + expected["completion_tokens"],
    )  # fmt: skip


def test_system_turns_reach_templated_models_and_blenderbot_ignores_them(url):
    client = client_for(url)

    def prompt_tokens(*system: str) -> int:
        messages = [{"role": "system", "content": s} for s in system]
        completion = client.chat.completions.create(
            model=model_id(client), max_tokens=1,
            messages=[*messages, {"role": "user", "content": "hi"}],
        )  # fmt: skip
        return completion.usage.prompt_tokens

    family = service_info(url)["family"]
    with_system = prompt_tokens("You are a pirate.")
    if family == "encoder-decoder":
        assert with_system == prompt_tokens()
    else:
        assert with_system > prompt_tokens()


def test_a_streamed_reply_arrives_in_pieces_that_add_up_to_the_greedy_reply(url):
    client = client_for(url)
    chunks = list(client.chat.completions.create(
        model=model_id(client),
        messages=[{"role": "user", "content": "Tell me about your weekend."}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    expected = respond(url, "Tell me about your weekend.", max_new_tokens=12, num_beams=1)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1
    assert "".join(texts) == expected["reply"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == expected["finish_reason"]
    assert chunks[-1].usage.completion_tokens == expected["completion_tokens"]
    assert len({c.id for c in chunks}) == 1


def test_the_stream_is_server_sent_events_ending_with_done(server):
    payload = {
        "model": model_id(client_for(server)), "stream": True, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    }  # fmt: skip
    with LOCAL.stream("POST", f"{server}/v1/chat/completions", json=payload, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_whole_replies_share_batches(either_batching):
    server = either_batching
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    model = model_id(client_for(server))

    async def ask_all() -> list:
        return await asyncio.gather(*(
            client.chat.completions.create(
                model=model, max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": f"Question number {i}?"}],
            ) for i in range(16)
        ))  # fmt: skip

    before = batch_sizes(server)
    completions = asyncio.run(ask_all())
    assert all(c.choices[0].message.content for c in completions)
    assert max(batch_sizes(server) - before) > 1


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"n": 9}, openai.BadRequestError, "n"),
        ({"stream": True, "extra_body": {"num_beams": 4}}, openai.BadRequestError,
         "beam search cannot stream"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, openai.BadRequestError,
         "the last message must come from the user"),
        ({"temperature": 3}, openai.BadRequestError, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
        ({"top_logprobs": 2}, openai.BadRequestError, "top_logprobs needs logprobs"),
        ({"logprobs": True, "extra_body": {"num_beams": 4}}, openai.BadRequestError,
         "log-probabilities need num_beams 1"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
         openai.BadRequestError, "tools: this service does not call tools"),
        ({"response_format": {"type": "json_object"}}, openai.BadRequestError,
         "response_format: 'json_object' cannot be guaranteed"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_4xx_with_a_message(server, change, error, message):
    client = client_for(server)
    request = {
        "model": model_id(client), "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}], **change,
    }  # fmt: skip
    with pytest.raises(error, match=message):
        client.chat.completions.create(**request)
