"""Conversations kept in SQLite, so a page refresh or restart loses nothing.

A user's message is written before it is sent to the service: if the service fails,
the message is still there to retry.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "blenderbot-chat"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an old link must not open another chat
    created_at TEXT NOT NULL,
    owner TEXT,  -- NULL: written before conversations had owners (see claim_unowned)
    public_id TEXT  -- what links name: unguessable, unlike id
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    created_at TEXT NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'done'  -- a reply: 'writing', 'stopped' or 'done'
);
"""
_ADDED_COLUMNS = {  # columns later versions added, for databases written before them
    "conversations": {"owner": "TEXT", "public_id": "TEXT"},
    "messages": {"state": "TEXT NOT NULL DEFAULT 'done'"},
}

ReplyState = Literal["writing", "stopped", "done"]


def data_dir() -> Path:
    return Path(os.environ.get("CHATBOT_DATA_DIR") or DEFAULT_DATA_DIR)


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


class ChatStore:
    """Conversations, each kept for its owner: an anonymous browser or a signed-in
    person (``frontend.owners``). Every read and write names the owner, so one owner's
    conversation can never be listed, opened or deleted by another."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / "conversations.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            self._migrate(db)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA foreign_keys = ON")
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a database written by an earlier page up to date, keeping every row."""
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        for (conversation,) in db.execute(
            "SELECT id FROM conversations WHERE public_id IS NULL"
        ).fetchall():
            db.execute(
                "UPDATE conversations SET public_id = ? WHERE id = ?", (_public_id(), conversation)
            )
        db.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS conversations_public_id ON conversations(public_id)"
        )

    def claim_unowned(self, owner: str) -> int:
        """Give the conversations written before owners existed to ``owner`` (the
        first visitor after the upgrade: before it, every visitor saw them anyway)."""
        with self._connect() as db:
            return db.execute(
                "UPDATE conversations SET owner = ? WHERE owner IS NULL", (owner,)
            ).rowcount

    def new_conversation(self, owner: str) -> ConversationSummary:
        public_id, created = _public_id(), _now()
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO conversations (created_at, owner, public_id) VALUES (?, ?, ?)",
                (created, owner, public_id),
            )
            return ConversationSummary(int(cursor.lastrowid or 0), public_id, created, "")

    def find(self, public_id: str, owner: str) -> int | None:
        """The conversation a link names, if it is ``owner``'s."""
        with self._connect() as db:
            row = db.execute(
                "SELECT id FROM conversations WHERE public_id = ? AND owner = ?",
                (public_id, owner),
            ).fetchone()
        return None if row is None else int(row[0])

    def add(
        self,
        conversation_id: int,
        role: str,
        content: str,
        truncated: bool = False,
        state: ReplyState = "done",
    ) -> int:
        """Store a message; its id (a reply being written is updated as it grows)."""
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, role, content, created_at, truncated,"
                " state) VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, _now(), int(truncated), state),
            )
            return int(cursor.lastrowid or 0)

    def update_reply(
        self, message_id: int, content: str, state: ReplyState, truncated: bool = False
    ) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE messages SET content = ?, state = ?, truncated = ? WHERE id = ?",
                (content, state, int(truncated), message_id),
            )

    def remove_message(self, message_id: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT role, content, created_at, truncated, state, id FROM messages"
                " WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        return [StoredMessage(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    def conversations(self, owner: str) -> list[ConversationSummary]:
        """``owner``'s, newest first, titled by their first user message."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT c.id, c.public_id, c.created_at, COALESCE(("
                "  SELECT content FROM messages m WHERE m.conversation_id = c.id"
                "  AND m.role = 'user' ORDER BY m.id LIMIT 1), '')"
                " FROM conversations c WHERE c.owner = ? ORDER BY c.id DESC",
                (owner,),
            ).fetchall()
        return [ConversationSummary(r[0], r[1], r[2], r[3]) for r in rows]

    def delete(self, conversation_id: int, owner: str) -> None:
        """The conversation and every message of it, if it is ``owner``'s."""
        with self._connect() as db:
            db.execute(
                "DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
            )
