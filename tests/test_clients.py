"""The clients people already use, against the real ``bentoml serve``: the official
``openai`` package (sync and async, whole and streamed) with every field the service
honours, LangChain's ``ChatOpenAI``, the request bodies Open WebUI sends, and
BentoML's own HTTP clients; on both tiny model families."""

from __future__ import annotations

import asyncio
import json

import bentoml
import openai
import pytest
import requests
from conftest import Served, batch_sizes, wait_for
from test_generation_options import forward_logprobs

from chatbot.engine.chat_engine import ChatEngine
from chatbot.schemas import ChatRequest
from devtools.processes import LOCAL, service_info

pytestmark = pytest.mark.server  # every test here talks to a real server

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]
GREEDY = {"temperature": 0, "extra_body": {"num_beams": 1}}  # whole replies as streams


@pytest.fixture(params=["blenderbot", "decoder-only"])
def family(request: pytest.FixtureRequest) -> tuple[Served, ChatEngine]:
    """A server and an engine on the same checkpoint, in this process."""
    if request.param == "blenderbot":
        return request.getfixturevalue("served"), request.getfixturevalue("engine")
    return request.getfixturevalue("chat_model"), request.getfixturevalue("chat_engine")


@pytest.fixture
def url(family: tuple[Served, ChatEngine]) -> str:
    return family[0].url


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_text(url: str, max_tokens: int = 16) -> str:
    reply = sync_client(url).chat.completions.create(
        model="any", messages=HELLO, max_tokens=max_tokens, **GREEDY
    )
    return reply.choices[0].message.content


def a_stop_in(text: str) -> tuple[str, int]:
    """Three characters from the middle of ``text`` (after a non-space) and where
    they first start."""
    for at in range(len(text) // 2, len(text) - 3):
        stop = text[at : at + 3]
        if stop.strip() and not text[at - 1].isspace() and text.find(stop) == at:
            return stop, at
    raise AssertionError(f"no stop text to cut {text!r} with")


def test_every_answer_names_the_model_not_a_path(url):
    info = service_info(url)
    (model,) = sync_client(url).models.list().data
    assert model.id == info["model"] in {"tiny-blenderbot", "tiny-chat"}


def test_a_stop_text_ends_whole_and_streamed_replies_sync_and_async(url):
    text = greedy_text(url)
    stop, at = a_stop_in(text)
    options = {"model": "any", "messages": HELLO, "max_tokens": 16, "stop": [stop], **GREEDY}
    whole = sync_client(url).chat.completions.create(**options)
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (
        text[:at], "stop",
    )  # fmt: skip

    async def streamed() -> tuple[list[str], str | None]:
        chunks = await async_client(url).chat.completions.create(**options, stream=True)
        pieces, finish = [], None
        async for chunk in chunks:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        return pieces, finish

    pieces, finish = asyncio.run(streamed())
    assert ("".join(pieces), finish) == (text[:at], "stop")  # no character of it was sent


def test_a_seed_gives_the_same_reply_whatever_else_is_decoded(url):
    client = async_client(url)

    def ask(content: str, seed: int, n: int = 1):
        return client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": content}], n=n,
            max_tokens=12, temperature=1.0, seed=seed,
        )  # fmt: skip

    async def alone_then_crowded() -> tuple[list[str], list[str]]:
        alone = await ask("Tell me a story", 42, n=2)
        others = [ask(f"Question {i}?", i) for i in range(6)]
        crowded, *_ = await asyncio.gather(ask("Tell me a story", 42, n=2), *others)
        return [c.message.content for c in alone.choices], [
            c.message.content for c in crowded.choices
        ]

    alone, crowded = asyncio.run(alone_then_crowded())
    assert alone == crowded
    assert alone[0] != alone[1]  # choice i samples with seed + i


def test_logprobs_are_the_models_own(family):
    served, engine = family
    completion = sync_client(served.url).chat.completions.create(
        model="any", messages=HELLO, max_tokens=10, logprobs=True, top_logprobs=2, **GREEDY
    )
    chat = ChatRequest(messages=HELLO, num_beams=1, max_new_tokens=10)
    prompt = engine.encode(chat).input_ids
    ids = engine.generate_ids([prompt], engine.plan(chat))[0]
    expected = [
        lp
        for token, lp in zip(ids, forward_logprobs(engine, prompt, ids), strict=True)
        if token not in engine.replies.textless_ids
    ]
    content = completion.choices[0].logprobs.content
    assert [t.logprob for t in content] == pytest.approx(expected, abs=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_n_replies_are_decoded_together_and_streamed_side_by_side(url):
    client = sync_client(url)
    before = batch_sizes(url)
    whole = client.chat.completions.create(
        model="any", messages=HELLO, n=4, max_tokens=8, temperature=0.9
    )
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert max(batch_sizes(url) - before) >= 4  # one batch held all four
    single = client.chat.completions.create(model="any", messages=HELLO, max_tokens=1)
    assert whole.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt, read once
    chunks = list(client.chat.completions.create(
        model="any", messages=HELLO, n=2, max_tokens=8, temperature=0.9, stream=True,
        stream_options={"include_usage": True}, logprobs=True,
    ))  # fmt: skip
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices}
    assert set(finished) == {0, 1}
    assert all(finished.values())
    logprobs = [t for c in chunks if c.choices and c.choices[0].logprobs for t in
                c.choices[0].logprobs.content]  # fmt: skip
    assert len(logprobs) <= chunks[-1].usage.completion_tokens


def test_penalties_and_vllms_extras_mean_what_they_mean_on_respond(url):
    options = {"frequency_penalty": 1.2, "presence_penalty": 0.4, "repetition_penalty": 1.3}
    completion = sync_client(url).chat.completions.create(
        model="any", messages=HELLO, max_tokens=12, **GREEDY | {"extra_body": {
            "num_beams": 1, **options}},
    )  # fmt: skip
    respond = LOCAL.post(
        f"{url}/respond", timeout=60,
        json={"messages": HELLO, "max_new_tokens": 12, "num_beams": 1, **options},
    ).json()  # fmt: skip
    assert completion.choices[0].message.content == respond["reply"]
    sampled = sync_client(url).chat.completions.create(
        model="any", messages=HELLO, max_tokens=12, temperature=0.7, seed=3,
        extra_body={"top_k": 1, "min_p": 0.05},
    )  # fmt: skip
    assert sampled.choices[0].message.content == greedy_text(url, 12)  # top_k 1 is greedy


def test_completions_continue_text_whole_streamed_echoed_with_logprobs(url):
    client = sync_client(url)
    prompts = ["Once upon a time", "The weather today"]
    whole = client.completions.create(
        model="any", prompt=prompts, n=2, max_tokens=8, echo=True, **GREEDY
    )
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert [c.text.startswith(p) for c, p in zip(whole.choices, [*prompts[:1] * 2,
            *prompts[1:] * 2], strict=True)] == [True] * 4  # fmt: skip
    plain = client.completions.create(model="any", prompt=prompts[0], max_tokens=8,
                                      logprobs=2, **GREEDY)  # fmt: skip
    choice = plain.choices[0]
    assert prompts[0] + choice.text == whole.choices[0].text
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
    assert all(len(alternatives) == 2 for alternatives in choice.logprobs.top_logprobs)
    streamed = client.completions.create(model="any", prompt=prompts[0], max_tokens=8,
                                         stream=True, **GREEDY)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_langchain_invokes_streams_and_batches_with_stop_and_seed(served):
    # Imported here: at collection, which every pytest process (make check's too)
    # does for every module, LangChain took 3 s.
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{served.url}/v1", api_key="unused", model="any", max_tokens=16,
        temperature=0, max_retries=0, extra_body={"num_beams": 1},
    )  # fmt: skip
    text = llm.invoke("Hello, how are you today?").content
    assert "".join(chunk.content for chunk in llm.stream("Hello, how are you today?")) == text
    stop, at = a_stop_in(text)
    assert llm.invoke("Hello, how are you today?", stop=[stop]).content == text[:at]
    assert llm.batch(["Hello, how are you today?", "Hi"])[0].content == text
    seeded = ChatOpenAI(
        base_url=f"{served.url}/v1", api_key="unused", model="any", max_tokens=12,
        temperature=0.9, seed=7, max_retries=0,
    )  # fmt: skip
    assert len({seeded.invoke("Tell me a story").content for _ in range(2)}) == 1


# Open WebUI's OpenAI connection (backend/open_webui/utils/payload.py): the model's saved
# parameters are copied into the body, OpenAI's by name and cast, anything else as is.
OPEN_WEBUI_CHAT = {
    "model": "tiny", "stream": True, "stream_options": {"include_usage": True},
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
    ],
    "temperature": 0.8, "top_p": 0.9, "max_tokens": 12, "seed": 5, "stop": ["\n\n"],
    "frequency_penalty": 0.1, "presence_penalty": 0.1, "min_p": 0.05, "logit_bias": {},
    "reasoning_effort": "medium", "top_k": 40, "num_ctx": 2048, "keep_alive": "5m",
    "repeat_penalty": 1.1, "metadata": {"chat_id": "abc"},
}  # fmt: skip
OPEN_WEBUI_TITLE = {  # the title it asks for once a chat starts (not streamed)
    "model": "tiny", "stream": False, "max_tokens": 50,
    "messages": [{"role": "user", "content": "### Task:\nGenerate a concise title ..."}],
    "metadata": {"task": "title_generation"},
}  # fmt: skip


def test_the_bodies_open_webui_sends_succeed_and_extras_are_logged(family):
    served, _ = family
    with LOCAL.stream(
        "POST", f"{served.url}/v1/chat/completions", json=OPEN_WEBUI_CHAT, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] >= 1
    title = LOCAL.post(f"{served.url}/v1/chat/completions", json=OPEN_WEBUI_TITLE, timeout=60)
    assert title.status_code == 200
    assert title.json()["choices"][0]["message"]["content"]

    def logged() -> list[dict]:
        lines = served.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if '"ignored_fields"' in line]

    wait_for(lambda: bool(logged()), "a log line naming ignored fields")
    assert {"num_ctx", "keep_alive", "repeat_penalty", "logit_bias", "metadata"} <= set(
        logged()[-1 if len(logged()) == 1 else -2]["ignored_fields"]
    )


def test_bentomls_clients_get_plain_python_values(served):
    legacy = {"user_input": "Hello, how are you today?"}
    expected = requests.post(f"{served.url}/chat", json=legacy, timeout=60).json()
    chat = [{"role": "user", "content": "Hi"}]
    with bentoml.SyncHTTPClient(served.url) as client:
        assert client.chat(**legacy) == expected  # a str, no JSON quotes
        reply = client.respond(messages=chat, max_new_tokens=4)
        assert set(reply) == {"reply", "model", "prompt_tokens", "completion_tokens",
                              "truncated", "finish_reason"}  # fmt: skip
        replies = client.generate(requests=[{"messages": chat, "max_new_tokens": 4}] * 2)
        assert [r["reply"] for r in replies] == [reply["reply"]] * 2

    async def asynchronously() -> str:
        async with bentoml.AsyncHTTPClient(served.url) as client:
            return await client.chat(**legacy)

    assert asyncio.run(asynchronously()) == expected


@pytest.mark.parametrize("route", ["/info", "/chat", "/respond", "/generate",
                                   "/v1/chat/completions", "/v1/completions"])  # fmt: skip
@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "application/x-www-form-urlencoded", "text/plain"]
)
def test_a_body_that_is_not_json_is_a_415_that_says_so(server, route, content_type):
    response = LOCAL.post(
        f"{server}{route}", content=b'{"user_input": "hi"}', headers={"content-type": content_type}
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]
