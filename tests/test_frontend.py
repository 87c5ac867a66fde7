"""The Streamlit page (AppTest) against the real service on the tiny model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from devtools.processes import free_port
from frontend.export import to_csv, to_json
from frontend.store import ChatStore

APP = str(Path(__file__).resolve().parent.parent / "frontend" / "app.py")


@pytest.fixture
def page_env(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CHATBOT_URL", server)
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(tmp_path))
    return tmp_path


def open_page(conversation: str | None = None) -> AppTest:
    page = AppTest.from_file(APP, default_timeout=120)
    if conversation is not None:
        page.query_params["c"] = conversation
    return page.run()


def thread(page: AppTest) -> list[tuple[str, str]]:
    """(role, text) of each chat bubble that shows a message (not an error)."""
    return [(m.name, m.markdown[0].value) for m in page.chat_message if m.markdown]


def say(page: AppTest, text: str) -> AppTest:
    return page.chat_input[0].set_value(text).run()


def test_a_message_gets_a_reply_that_survives_a_reload(page_env):
    page = say(open_page(), "Hello there! 👋 Ça va?")
    assert not page.exception
    assert not page.error
    (user, said), (bot, reply) = thread(page)
    assert (user, said) == ("user", "Hello there! 👋 Ça va?")
    assert bot == "assistant"
    assert reply

    reloaded = open_page(page.query_params["c"][0])
    assert thread(reloaded) == thread(page)


def test_sidebar_shows_the_model_and_bounded_options(page_env):
    page = open_page()
    assert "tiny-blenderbot" in page.sidebar.caption[0].value
    assert "(cpu, float32)" in page.sidebar.caption[0].value
    max_new_tokens = page.sidebar.slider[0]
    assert (max_new_tokens.min, max_new_tokens.max, max_new_tokens.value) == (1, 127, 59)
    page.sidebar.radio[0].set_value("Sampling").run()
    assert [s.label for s in page.sidebar.slider] == ["Max new tokens", "Temperature", "Top-p"]


def test_greedy_and_sampled_replies_stream_in_and_are_kept(page_env, server):
    page = open_page()
    page.sidebar.slider[1].set_value(1).run()  # one beam: greedy decoding streams
    page = say(page, "Tell me about your dog.")
    assert not page.exception
    assert not page.error
    (_, reply) = thread(page)[-1]
    whole = httpx.post(f"{server}/respond", json={
        "messages": [{"role": "user", "content": "Tell me about your dog."}],
        "num_beams": 1, "do_sample": False, "max_new_tokens": 59}, timeout=60).json()  # fmt: skip
    assert reply == whole["reply"]  # the streamed pieces add up to the whole reply
    assert thread(open_page(page.query_params["c"][0])) == thread(page)
    page.sidebar.radio[0].set_value("Sampling").run()
    page = say(page, "And your cat?")
    assert not page.error
    assert len(thread(page)) == 4
    assert thread(page)[-1][1]


def test_clear_conversation_starts_a_new_thread_and_keeps_the_old(page_env):
    page = say(open_page(), "first conversation")
    first = page.query_params["c"][0]
    page = page.button(key="clear").click().run()
    assert page.query_params["c"][0] != first
    assert thread(page) == []
    assert "first conversation" in [b.label for b in page.sidebar.button]


def test_past_conversations_can_be_deleted(page_env):
    page = say(open_page(), "to be deleted")
    conversation = int(page.query_params["c"][0])
    page.sidebar.button(key=f"delete-{conversation}").click().run()
    assert conversation not in [
        c.id for c in ChatStore(page_env / "conversations.sqlite3").conversations()
    ]


def test_a_down_service_is_explained_and_the_message_kept(page_env, server, monkeypatch):
    monkeypatch.setenv("CHATBOT_URL", f"http://127.0.0.1:{free_port()}")
    page = say(open_page(), "are you there?")
    assert "cannot be reached" in page.error[0].value
    assert thread(page) == [("user", "are you there?")]

    monkeypatch.setenv("CHATBOT_URL", server)
    page = open_page(page.query_params["c"][0])
    assert thread(page) == [("user", "are you there?")]
    page = page.button(key="retry").click().run()
    assert [role for role, _ in thread(page)] == ["user", "assistant"]


def test_truncation_is_shown(page_env):
    db = ChatStore(page_env / "conversations.sqlite3")
    conversation = db.new_conversation()
    for i in range(10):
        db.add(conversation, "user", f"this is a long message number {i} " * 4)
        db.add(conversation, "assistant", f"and a long answer number {i} " * 4)
    page = say(open_page(str(conversation)), "and now?")
    assert any("most recent part" in c.value for c in page.caption)


def test_exports_keep_every_message_and_unicode(tmp_path):
    db = ChatStore(tmp_path / "c.sqlite3")
    conversation = db.new_conversation()
    db.add(conversation, "user", 'Grüße, 世界 👋, "quoted", comma')
    db.add(conversation, "assistant", "line one\nline two")
    messages = db.messages(conversation)

    data = to_csv(messages)
    assert data.startswith(b"\xef\xbb\xbf")  # BOM: spreadsheets read UTF-8
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    assert [(r["turn"], r["role"], r["text"]) for r in rows] == [
        ("1", "user", 'Grüße, 世界 👋, "quoted", comma'),
        ("2", "assistant", "line one\nline two"),
    ]
    assert all(r["timestamp"] for r in rows)
    assert [m["text"] for m in json.loads(to_json(messages))] == [r["text"] for r in rows]
