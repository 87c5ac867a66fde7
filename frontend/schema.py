"""The page's tables, as the newest migration (``frontend/migrations``) leaves them.

The store reads and writes through these; the migrations keep their own frozen copies,
because a migration must do the same thing whatever the schema becomes later.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    false,
    text,
)

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    # Never reused (SQLite's AUTOINCREMENT; PostgreSQL's sequences never go back).
    Column("id", Integer, primary_key=True),
    Column("created_at", Text, nullable=False),  # ISO 8601, UTC
    Column("owner", Text),  # NULL: written before conversations had owners
    Column("public_id", Text),  # what links name: unguessable, unlike id
    Index("conversations_public_id", "public_id", unique=True),
    Index("conversations_owner", "owner"),
    sqlite_autoincrement=True,
)

messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("role", Text, CheckConstraint("role IN ('user', 'assistant')"), nullable=False),
    Column("content", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("truncated", Boolean, nullable=False, server_default=false()),
    Column("state", Text, nullable=False, server_default=text("'done'")),  # writing/stopped/done
    # A reply being written: when its writer last said it is alive (Unix seconds), and
    # whether a page (any copy) asked it to stop.
    Column("touched_at", Float),
    Column("stop_requested", Boolean, nullable=False, server_default=false()),
    Index("messages_conversation", "conversation_id"),
)
