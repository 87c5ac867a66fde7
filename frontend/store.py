"""Conversations kept in SQLite, so a page refresh or restart loses nothing.

A user's message is written before it is sent to the service: if the service fails,
the message is still there to retry.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "blenderbot-chat"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an old link must not open another chat
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    created_at TEXT NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0
);
"""


def data_dir() -> Path:
    return Path(os.environ.get("CHATBOT_DATA_DIR") or DEFAULT_DATA_DIR)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StoredMessage:
    role: str
    content: str
    created_at: str
    truncated: bool = False


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    created_at: str
    title: str


class ChatStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / "conversations.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def new_conversation(self) -> int:
        with self._connect() as db:
            cursor = db.execute("INSERT INTO conversations (created_at) VALUES (?)", (_now(),))
            return int(cursor.lastrowid)

    def add(self, conversation_id: int, role: str, content: str, truncated: bool = False) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO messages (conversation_id, role, content, created_at, truncated)"
                " VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, _now(), int(truncated)),
            )

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT role, content, created_at, truncated FROM messages"
                " WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        return [StoredMessage(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def conversations(self) -> list[ConversationSummary]:
        """Newest first, titled by their first user message."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT c.id, c.created_at, COALESCE(("
                "  SELECT content FROM messages m WHERE m.conversation_id = c.id"
                "  AND m.role = 'user' ORDER BY m.id LIMIT 1), '')"
                " FROM conversations c ORDER BY c.id DESC"
            ).fetchall()
        return [ConversationSummary(r[0], r[1], r[2]) for r in rows]

    def delete(self, conversation_id: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
