"""Streamlit chat page for the Blenderbot service.

    CHATBOT_URL=http://127.0.0.1:3000 streamlit run frontend/app.py

The thread lives in SQLite (``CHATBOT_DATA_DIR``) and its id in the page URL, so a
refresh or a restart of the page shows the same conversation.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frontend.client import ChatClient, ServiceError
from frontend.export import to_csv, to_json
from frontend.store import ChatStore, StoredMessage

TRUNCATION_NOTE = "The model only saw the most recent part of this conversation."


OFFLINE_MODEL_NOTE = (
    "This is the tiny offline test model: its weights are random, so its replies are "
    "random words. With internet access, `make run` serves facebook/blenderbot-400M-distill."
)


def current_conversation(db: ChatStore) -> int:
    """The conversation named in the URL, else the newest one, else a new one."""
    known = {c.id for c in db.conversations()}
    wanted = st.query_params.get("c", "")
    if wanted.isdigit() and int(wanted) in known:
        return int(wanted)
    conversation = max(known) if known else db.new_conversation()
    st.query_params["c"] = str(conversation)
    return conversation


def open_conversation(conversation: int) -> None:
    st.query_params["c"] = str(conversation)


def generation_options(info: dict[str, Any] | None) -> dict[str, Any]:
    """Sidebar controls; their bounds come from the service, so values are valid."""
    st.sidebar.subheader("Reply settings")
    if info is None:
        return {}
    max_new_tokens = st.sidebar.slider(
        "Max new tokens", 1, info["max_new_tokens_limit"], info["default_max_new_tokens"]
    )
    mode = st.sidebar.radio("Decoding", ["Beam search", "Sampling"], horizontal=True)
    if mode == "Sampling":
        return {
            "max_new_tokens": max_new_tokens,
            "num_beams": 1,
            "do_sample": True,
            "temperature": st.sidebar.slider("Temperature", 0.1, 2.0, 0.7, 0.05),
            "top_p": st.sidebar.slider("Top-p", 0.05, 1.0, 0.9, 0.05),
        }
    beams = st.sidebar.slider("Beams", 1, info["max_beams"], info["default_num_beams"])
    return {"max_new_tokens": max_new_tokens, "num_beams": beams, "do_sample": False}


def sidebar(
    db: ChatStore, api: ChatClient, conversation: int, messages: list[StoredMessage]
) -> tuple[str | None, dict[str, Any]]:
    """The served model's id (None when the service is down) and the reply options."""
    st.sidebar.title("Blenderbot chat")
    try:
        info: dict[str, Any] | None = api.info()
        st.sidebar.caption(f"Model: **{info['model']}** ({info['device']}, {info['dtype']})")
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
        open_conversation(db.new_conversation())
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
    past_conversations(db, conversation)
    return (info["model"] if info else None), options


def past_conversations(db: ChatStore, current: int) -> None:
    st.sidebar.subheader("Past conversations")
    for summary in db.conversations():
        title = summary.title[:40] or "(empty)"
        open_col, delete_col = st.sidebar.columns([5, 1])
        if open_col.button(
            title, key=f"open-{summary.id}", disabled=summary.id == current,
            use_container_width=True,
        ):  # fmt: skip
            open_conversation(summary.id)
            st.rerun()
        if delete_col.button("✕", key=f"delete-{summary.id}", help="Delete"):
            db.delete(summary.id)
            st.rerun()


def show_text(content: str, truncated: bool) -> None:
    """One bubble's text, with the truncation note under a reply that needed it."""
    st.markdown(content or "_(no words)_")
    if truncated:
        st.caption(TRUNCATION_NOTE)


def show_thread(messages: list[StoredMessage]) -> None:
    for message in messages:
        with st.chat_message(message.role):
            show_text(message.content, message.truncated)


def answer(
    db: ChatStore,
    api: ChatClient,
    conversation: int,
    model: str | None,
    options: dict[str, Any],
) -> None:
    """Ask the service to answer the thread, whose last message is the user's.

    Greedy and sampled replies stream in as they are written; beam search only
    knows its reply at the end, so a spinner waits for it.
    """
    messages = [{"role": m.role, "content": m.content} for m in db.messages(conversation)]
    with st.chat_message("assistant"):
        status = st.empty()

        def tell_busy(wait_s: float) -> None:
            status.info(f"The chat service is busy; asking again in {wait_s:.0f} s…")

        try:
            if model is not None and options.get("num_beams") == 1:
                streamed = api.stream(model, messages, on_busy=tell_busy, **options)
                status.empty()
                text, truncated = st.write_stream(streamed), streamed.truncated
                if truncated:
                    st.caption(TRUNCATION_NOTE)
            else:
                with st.spinner("Thinking…"):
                    reply = api.respond(messages, on_busy=tell_busy, **options)
                text, truncated = reply["reply"], reply["truncated"]
                status.empty()
                show_text(text, truncated)
        except ServiceError as error:
            status.empty()
            st.error(f"{error} Your message is saved: press Retry to send it again.")
            return
        db.add(conversation, "assistant", text, truncated)


def main() -> None:
    st.set_page_config(page_title="Blenderbot chat", page_icon="💬")
    db, api = ChatStore(), ChatClient.from_env()
    conversation = current_conversation(db)
    messages = db.messages(conversation)
    model, options = sidebar(db, api, conversation, messages)
    show_thread(messages)
    unanswered = bool(messages) and messages[-1].role == "user"
    if unanswered and st.button("Retry", key="retry", icon=":material/refresh:"):
        answer(db, api, conversation, model, options)
    if (text := st.chat_input("Say something…")) and text.strip():
        db.add(conversation, "user", text)
        with st.chat_message("user"):
            st.markdown(text)
        answer(db, api, conversation, model, options)


main()
