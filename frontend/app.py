"""Streamlit chat page for the Blenderbot service.

    CHATBOT_URL=http://127.0.0.1:3000 streamlit run frontend/app.py

The thread lives in a database (``frontend.store``: SQLite in ``CHATBOT_DATA_DIR``, or
``CHATBOT_DATABASE_URL``), kept for its owner (this browser, or a signed-in person:
``frontend.owners``), and its unguessable id in the page URL, so a refresh, a restart
or another copy of the page shows the same conversation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frontend.client import ChatClient, ServiceError
from frontend.export import to_csv, to_json
from frontend.owners import current_owner, sign_in_configured, signed_in
from frontend.store import ChatStore, StoredMessage, database_url

TRUNCATION_NOTE = "The model only saw the most recent part of this conversation."


OFFLINE_MODEL_NOTE = (
    "This is the tiny offline test model: its weights are random, so its replies are "
    "random words. With internet access, `make run` serves facebook/blenderbot-400M-distill."
)


STOPPED_NOTE = "Stopped: the reply ends here."
SHOW_EVERY_S = 0.1
"""How often a streamed reply grows on the page and in the store: the first piece at
once, then what came meanwhile. Shown token by token, a 128-token reply took 1.8x as
long on the page as straight from the service, the page and the browser taking CPU
from the service on a 2-core machine (``benchmarks/page_reply.py``)."""
WRITTEN_ELSEWHERE = "Being written (in another tab, or before a reload)…"
NOT_YOURS = "That conversation link is not one of yours (or it was deleted): here are yours."


@st.cache_resource
def store(url: str) -> ChatStore:
    """One store (its connection pool, its schema check) per page process and database."""
    return ChatStore(url)


def current_conversation(db: ChatStore, owner: str) -> int:
    """The owner's conversation named in the URL, else their newest, else a new one."""
    wanted = st.query_params.get("c", "")
    if wanted and (found := db.find(wanted, owner)) is not None:
        return found
    if wanted:
        st.toast(NOT_YOURS)
    mine = db.conversations(owner)
    conversation = mine[0] if mine else db.new_conversation(owner)
    st.query_params["c"] = conversation.public_id
    return conversation.id


def open_conversation(public_id: str) -> None:
    st.query_params["c"] = public_id


def generation_options(info: dict[str, Any] | None) -> dict[str, Any]:
    """Sidebar controls; their bounds and defaults come from the service."""
    st.sidebar.subheader("Reply settings")
    if info is None:
        return {}
    max_new_tokens = st.sidebar.slider(
        "Max new tokens", 1, info["max_new_tokens_limit"], info["default_max_new_tokens"]
    )
    modes = ["Greedy", "Beam search", "Sampling"]
    default = "Sampling" if info["default_do_sample"] else modes[info["default_num_beams"] > 1]
    mode = st.sidebar.radio("Decoding", modes, index=modes.index(default), horizontal=True)
    if mode == "Sampling":
        return {
            "max_new_tokens": max_new_tokens,
            "num_beams": 1,
            "do_sample": True,
            "temperature": st.sidebar.slider(
                "Temperature", 0.05, 2.0, info.get("default_temperature", 0.7), 0.05
            ),
            "top_p": st.sidebar.slider("Top-p", 0.05, 1.0, info.get("default_top_p", 0.9), 0.05),
        }
    beams = 1
    if mode == "Beam search":
        beams = st.sidebar.slider("Beams", 2, info["max_beams"], max(2, info["default_num_beams"]))
    return {"max_new_tokens": max_new_tokens, "num_beams": beams, "do_sample": False}


def account() -> None:
    """Sign-in, when ``[auth]`` is configured (``frontend.owners``)."""
    if not sign_in_configured():
        return
    if signed_in():
        st.sidebar.caption(f"Signed in as **{st.user.get('name') or st.user.get('email')}**")
        st.sidebar.button("Sign out", key="sign-out", on_click=st.logout)
    else:
        st.sidebar.caption("Your conversations are kept in this browser only.")
        st.sidebar.button("Sign in", key="sign-in", on_click=st.login)


def sidebar(
    db: ChatStore, api: ChatClient, owner: str, conversation: int, messages: list[StoredMessage]
) -> tuple[str | None, dict[str, Any]]:
    """The served model's id (None when the service is down) and the reply options."""
    st.sidebar.title("Blenderbot chat")
    account()
    try:
        info: dict[str, Any] | None = api.info()
        step = {"compiled": ", compiled", "compiling": ", compiling"}.get(
            info.get("decode_step"), ""
        )
        st.sidebar.caption(f"Model: **{info['model']}** ({info['device']}, {info['dtype']}{step})")
        if note := info.get("note"):
            st.sidebar.info(note)
        elif info["model"].endswith("tiny-blenderbot"):
            st.sidebar.info(OFFLINE_MODEL_NOTE)
    except ServiceError as error:
        info = None
        st.sidebar.warning(str(error))
    options = generation_options(info)

    st.sidebar.subheader("Conversation")
    if st.sidebar.button("Clear conversation", key="clear", icon=":material/add_comment:"):
        open_conversation(db.new_conversation(owner).public_id)
        st.rerun()
    st.sidebar.download_button(
        "Download conversation (CSV)", to_csv(messages),
        file_name=f"conversation-{conversation}.csv", mime="text/csv",
        disabled=not messages,
    )  # fmt: skip
    st.sidebar.download_button(
        "Download conversation (JSON)", to_json(messages),
        file_name=f"conversation-{conversation}.json", mime="application/json",
        disabled=not messages,
    )  # fmt: skip
    past_conversations(db, owner, conversation)
    return (info["model"] if info else None), options


def past_conversations(db: ChatStore, owner: str, current: int) -> None:
    st.sidebar.subheader("Past conversations")
    for summary in db.conversations(owner):
        title = summary.title[:40] or "(empty)"
        open_col, delete_col = st.sidebar.columns([5, 1])
        if open_col.button(
            title, key=f"open-{summary.id}", disabled=summary.id == current,
            use_container_width=True,
        ):  # fmt: skip
            open_conversation(summary.public_id)
            st.rerun()
        with delete_col.popover("✕", help="Delete"):
            st.write(f"Delete “{title}” and all its messages?")
            if st.button("Delete", key=f"delete-{summary.id}", type="primary"):
                db.delete(summary.id, owner)
                st.rerun()


def show_text(content: str, truncated: bool, state: str = "done") -> None:
    """One bubble's text, with a note under a reply that was cut or stopped."""
    st.markdown(content or "_(no words)_")
    if truncated:
        st.caption(TRUNCATION_NOTE)
    if state == "stopped":
        st.caption(STOPPED_NOTE)


def show_thread(db: ChatStore, messages: list[StoredMessage]) -> None:
    """The thread. A reply that another session is writing, on this page copy or
    another, is followed as it grows, and can be stopped from here."""
    for message in messages:
        with st.chat_message(message.role):
            if message.state == "writing":
                follow_reply(db, message.id)
            else:
                show_text(message.content, message.truncated, message.state)


@st.fragment(run_every=1.0)
def follow_reply(db: ChatStore, message_id: int) -> None:
    """The reply as stored now; once it is no longer being written (done, stopped,
    or abandoned by a page copy that died), the whole page runs again."""
    reply = db.reply(message_id)
    if reply is None or reply.state != "writing":
        st.rerun(scope="app")
    assert reply is not None
    show_text(reply.content, reply.truncated)
    st.caption(WRITTEN_ELSEWHERE)
    st.button(
        "Stop", key=f"stop-{message_id}", icon=":material/stop_circle:",
        on_click=db.request_stop, args=(message_id,),
    )  # fmt: skip


def answer(
    db: ChatStore,
    api: ChatClient,
    conversation: int,
    model: str | None,
    options: dict[str, Any],
) -> str | None:
    """Ask the service to answer the thread, whose last message is the user's; what
    went wrong, if anything.

    Greedy and sampled replies stream in as they are written, and are stored as they
    grow: a reload shows what was written so far, and Stop (or leaving) keeps it,
    marked as stopped, while the service stops writing at its next step. Beam search
    only knows its reply at the end, so a spinner waits for it.
    """
    messages = [{"role": m.role, "content": m.content} for m in db.messages(conversation)]
    with st.chat_message("assistant"):
        status = st.empty()

        def tell_busy(wait_s: float) -> None:
            status.info(f"The chat service is busy; asking again in {wait_s:.0f} s…")

        try:
            if model is not None and options.get("num_beams") == 1:
                stream_reply(db, api, conversation, model, messages, options, tell_busy)
                return None
            with st.spinner("Thinking…"):
                reply = api.respond(messages, on_busy=tell_busy, **options)
        except ServiceError as error:
            return f"{error} Your message is saved: press Retry to send it again."
        db.add(conversation, "assistant", reply["reply"], reply["truncated"])
        return None


def stream_reply(
    db: ChatStore,
    api: ChatClient,
    conversation: int,
    model: str,
    messages: list[dict[str, str]],
    options: dict[str, Any],
    tell_busy: Callable[[float], None],
) -> None:
    streamed = api.stream(model, messages, on_busy=tell_busy, **options)
    reply_id = db.add(conversation, "assistant", "", state="writing")
    st.session_state.writing = reply_id
    st.button("Stop", key="stop", icon=":material/stop_circle:")  # a click reruns: see below
    pieces, text, state = iter(streamed), "", "stopped"

    def stored_as_written() -> Iterator[str]:
        nonlocal text, state
        shown, shown_at = 0, -SHOW_EVERY_S
        for piece in pieces:
            text += piece
            if time.monotonic() - shown_at >= SHOW_EVERY_S:
                if not db.grow_reply(reply_id, text):
                    return  # stopped from another tab or page copy
                yield text[shown:]
                shown, shown_at = len(text), time.monotonic()
        if len(text) > shown:
            yield text[shown:]
        state = "done"

    with db.kept_alive(reply_id):
        try:
            st.write_stream(stored_as_written())
        finally:  # also when Stop (or a new message) interrupts this run
            pieces.close()  # the service stops writing at its next step
            if state == "done" or text:
                db.update_reply(reply_id, text, state, streamed.truncated)
            else:
                db.remove_message(reply_id)  # nothing written: the message waits for Retry


def main() -> None:
    st.set_page_config(page_title="Blenderbot chat", page_icon="💬")
    db, api = store(database_url()), ChatClient.from_env()
    owner = current_owner()
    if not st.session_state.get("claimed"):
        db.claim_unowned(owner)
        st.session_state.claimed = True
    wait_for_the_interrupted_run(db)
    conversation = current_conversation(db, owner)
    stored = db.messages(conversation)
    model, options = sidebar(db, api, owner, conversation, stored)
    show_thread(db, stored)
    waiting = bool(stored) and stored[-1].role == "user"
    answering = st.session_state.pop("answer", None) == conversation and waiting
    followed = any(message.state == "writing" for message in stored)
    # One input, the same widget in every run (so no stale copy stays usable), disabled
    # while a reply is written, here or elsewhere.
    st.chat_input(
        "Say something…", key="message", disabled=answering or followed,
        on_submit=send, args=(db, conversation),
    )  # fmt: skip
    if answering:
        st.session_state.failure = answer(db, api, conversation, model, options)
        st.rerun()
    if failure := st.session_state.pop("failure", None):
        st.error(failure)
    if waiting:
        st.button(
            "Retry", key="retry", icon=":material/refresh:",
            on_click=ask_for_an_answer, args=(conversation,),
        )  # fmt: skip
    last = stored[-1] if stored else None
    if last is not None and last.role == "assistant" and not followed:
        st.button(
            "Regenerate", key="regenerate", icon=":material/autorenew:",
            on_click=regenerate, args=(db, conversation, last.id),
        )  # fmt: skip


def wait_for_the_interrupted_run(db: ChatStore, timeout_s: float = 5.0) -> None:
    """Stop, or a message typed while a reply streams, reruns the page while the run
    it interrupts is still closing that reply (Streamlit starts the new run at once):
    wait for it to be stored, so the thread shows it as it ended."""
    reply = st.session_state.pop("writing", None)
    deadline = time.monotonic() + timeout_s
    while reply is not None and time.monotonic() < deadline:
        stored = db.reply(reply)
        if stored is None or stored.state != "writing":
            return
        time.sleep(0.02)


def ask_for_an_answer(conversation: int) -> None:
    """Answer in the run about to start, which shows the thread with the input
    disabled. Buttons and the input call this (or the two below) as callbacks, which
    Streamlit runs before that run: a run of its own first would add its time
    (about 0.2 s) to every reply's wait."""
    st.session_state.answer = conversation


def send(db: ChatStore, conversation: int) -> None:
    """The input's callback: store the message sent, and answer it."""
    text = st.session_state.message
    if text and text.strip():
        db.add(conversation, "user", text)
        ask_for_an_answer(conversation)


def regenerate(db: ChatStore, conversation: int, reply: int) -> None:
    """Regenerate's callback: the reply is replaced (the thread and its export show
    the new one)."""
    db.remove_message(reply)
    ask_for_an_answer(conversation)


main()
