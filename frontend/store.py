"""Conversations kept in a database, so a reload, a restart or another copy of the
page loses nothing.

``CHATBOT_DATABASE_URL`` (a SQLAlchemy URL) picks the database: SQLite in
``CHATBOT_DATA_DIR`` by default (one page process, nothing to run), PostgreSQL
(``postgresql+psycopg://...``) for any number of page copies. The schema is brought up
to date by Alembic (``frontend/migrations``) when the store opens.

A user's message is written before it is sent to the service: if the service fails,
the message is still there to retry. A reply is written as it streams, and its writer
touches it at least every ``lease_s / 3`` seconds; a reply nobody touched for
``lease_s`` (its page copy died, say) is taken as stopped, keeping what it wrote.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    not_,
    select,
    update,
)

from frontend.migrations import upgrade
from frontend.schema import conversations, messages

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "blenderbot-chat"
DEFAULT_LEASE_S = 15.0

ReplyState = Literal["writing", "stopped", "done"]


def data_dir() -> Path:
    return Path(os.environ.get("CHATBOT_DATA_DIR") or DEFAULT_DATA_DIR)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def database_url() -> str:
    """``CHATBOT_DATABASE_URL``, else the SQLite file in ``CHATBOT_DATA_DIR``."""
    if url := os.environ.get("CHATBOT_DATABASE_URL"):
        return url
    data_dir().mkdir(parents=True, exist_ok=True)
    return sqlite_url(data_dir() / "conversations.sqlite3")


def reply_lease_s() -> float:
    return float(os.environ.get("CHATBOT_REPLY_LEASE_S") or DEFAULT_LEASE_S)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _public_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits


@dataclass(frozen=True)
class StoredMessage:
    role: str
    content: str
    created_at: str
    truncated: bool = False
    state: ReplyState = "done"
    id: int = 0


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    public_id: str
    created_at: str
    title: str


def connect(url: str) -> Engine:
    """An engine for ``url``: SQLite with its foreign keys on (they are off by default,
    and deleting a conversation relies on them), any server with stale connections
    replaced instead of failing the first query after a database restart."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA busy_timeout = 10000")  # writers wait for each other
            cursor.close()

    return engine


class ChatStore:
    """Conversations, each kept for its owner: an anonymous browser or a signed-in
    person (``frontend.owners``). Every read and write names the owner, so one owner's
    conversation can never be listed, opened or deleted by another."""

    def __init__(self, url: str | None = None, lease_s: float | None = None) -> None:
        self.engine = connect(url or database_url())
        self.lease_s = lease_s or reply_lease_s()
        upgrade(self.engine)

    def claim_unowned(self, owner: str) -> int:
        """Give the conversations written before owners existed to ``owner`` (the
        first visitor after the upgrade: before it, every visitor saw them anyway)."""
        with self.engine.begin() as db:
            claim = update(conversations).where(conversations.c.owner.is_(None))
            return db.execute(claim.values(owner=owner)).rowcount

    def new_conversation(self, owner: str) -> ConversationSummary:
        public_id, created = _public_id(), _now()
        with self.engine.begin() as db:
            row = db.execute(
                insert(conversations)
                .values(created_at=created, owner=owner, public_id=public_id)
                .returning(conversations.c.id)
            ).scalar_one()
        return ConversationSummary(row, public_id, created, "")

    def find(self, public_id: str, owner: str) -> int | None:
        """The conversation a link names, if it is ``owner``'s."""
        with self.engine.begin() as db:
            return db.execute(
                select(conversations.c.id).where(
                    conversations.c.public_id == public_id, conversations.c.owner == owner
                )
            ).scalar_one_or_none()

    def add(
        self,
        conversation_id: int,
        role: str,
        content: str,
        truncated: bool = False,
        state: ReplyState = "done",
    ) -> int:
        """Store a message; its id (a reply being written is updated as it grows)."""
        with self.engine.begin() as db:
            return db.execute(
                insert(messages)
                .values(
                    conversation_id=conversation_id,
                    role=role,
                    content=content,
                    created_at=_now(),
                    truncated=truncated,
                    state=state,
                    touched_at=time.time() if state == "writing" else None,
                )
                .returning(messages.c.id)
            ).scalar_one()

    def grow_reply(self, message_id: int, content: str) -> bool:
        """Store what a reply being written says so far; False when it is to stop
        writing: a page asked it to, or it was taken as stopped."""
        return self._touch(message_id, content=content)

    def touch(self, message_id: int) -> bool:
        """Say that the reply's writer is alive; False as for ``grow_reply``."""
        return self._touch(message_id)

    def _touch(self, message_id: int, **values: str) -> bool:
        with self.engine.begin() as db:
            return (
                db.execute(
                    update(messages)
                    .where(
                        messages.c.id == message_id,
                        messages.c.state == "writing",
                        self._touched_lately(),
                        messages.c.stop_requested.is_(False),
                    )
                    .values(touched_at=time.time(), **values)
                ).rowcount
                == 1
            )

    @contextlib.contextmanager
    def kept_alive(self, message_id: int) -> Iterator[None]:
        """While the block runs, touch the reply every ``lease_s / 3`` seconds, so that
        no copy takes it as abandoned while its writer waits on the service (a reply
        queued behind others writes nothing for a while)."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.lease_s / 3) and self.touch(message_id):
                pass

        beating = threading.Thread(target=beat, name=f"reply-{message_id}-alive", daemon=True)
        beating.start()
        try:
            yield
        finally:
            done.set()
            beating.join()

    def request_stop(self, message_id: int) -> None:
        """Ask the writer of a reply, on whichever page copy it runs, to stop it."""
        with self.engine.begin() as db:
            db.execute(
                update(messages).where(messages.c.id == message_id).values(stop_requested=True)
            )

    def update_reply(
        self, message_id: int, content: str, state: ReplyState, truncated: bool = False
    ) -> None:
        with self.engine.begin() as db:
            db.execute(
                update(messages)
                .where(messages.c.id == message_id)
                .values(content=content, state=state, truncated=truncated, touched_at=time.time())
            )

    def remove_message(self, message_id: int) -> None:
        with self.engine.begin() as db:
            db.execute(delete(messages).where(messages.c.id == message_id))

    def reply(self, message_id: int) -> StoredMessage | None:
        """One message as stored now (None once removed), a reply whose writer is
        gone read as stopped, as in ``messages``."""
        found = self._read(messages.c.id == message_id)
        return found[0] if found else None

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        """The thread, oldest first. A reply being written that its writer has not
        touched for ``lease_s`` reads as stopped: its writer is gone."""
        return self._read(messages.c.conversation_id == conversation_id)

    def _read(self, which: ColumnElement[bool]) -> list[StoredMessage]:
        state = case(
            (and_(messages.c.state == "writing", not_(self._touched_lately())), "stopped"),
            else_=messages.c.state,
        )
        with self.engine.begin() as db:
            rows = db.execute(
                select(
                    messages.c.role,
                    messages.c.content,
                    messages.c.created_at,
                    messages.c.truncated,
                    state,
                    messages.c.id,
                )
                .where(which)
                .order_by(messages.c.id)
            ).all()
        return [StoredMessage(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    def _touched_lately(self) -> ColumnElement[bool]:
        """Touched by its writer within the lease (a reply an older page left "writing"
        never was): else a reply being written is taken as stopped, by readers and by
        a writer that comes back late alike."""
        return func.coalesce(messages.c.touched_at, 0) >= time.time() - self.lease_s

    def conversations(self, owner: str) -> list[ConversationSummary]:
        """``owner``'s, newest first, titled by their first user message."""
        first_said = (
            select(messages.c.content)
            .where(messages.c.conversation_id == conversations.c.id, messages.c.role == "user")
            .order_by(messages.c.id)
            .limit(1)
            .scalar_subquery()
        )
        with self.engine.begin() as db:
            rows = db.execute(
                select(
                    conversations.c.id,
                    conversations.c.public_id,
                    conversations.c.created_at,
                    func.coalesce(first_said, ""),
                )
                .where(conversations.c.owner == owner)
                .order_by(conversations.c.id.desc())
            ).all()
        return [ConversationSummary(r[0], r[1], r[2], r[3]) for r in rows]

    def delete(self, conversation_id: int, owner: str) -> None:
        """The conversation and every message of it, if it is ``owner``'s."""
        with self.engine.begin() as db:
            db.execute(
                delete(conversations).where(
                    conversations.c.id == conversation_id, conversations.c.owner == owner
                )
            )
