"""Replies that any copy of the page can follow and stop.

A reply being written is now touched by its writer (``touched_at``) and can be asked
to stop from another copy (``stop_requested``); before, the page process that wrote it
kept both in memory, which other copies cannot see. Replies an older page left
"writing" have no ``touched_at`` and read as stopped. Indexes for what every page view
asks: an owner's conversations, a conversation's messages.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN, which SQLite has too: a copied ("batch") table would
    # lose the constraints SQLite cannot reflect (the role check, ON DELETE CASCADE).
    op.add_column("messages", sa.Column("touched_at", sa.Float))
    op.add_column(
        "messages",
        sa.Column("stop_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("messages_conversation", "messages", ["conversation_id"])
    op.create_index("conversations_owner", "conversations", ["owner"])


def downgrade() -> None:
    op.drop_index("conversations_owner", "conversations")
    op.drop_index("messages_conversation", "messages")
    op.drop_column("messages", "stop_requested")  # SQLite 3.35+ drops columns in place
    op.drop_column("messages", "touched_at")
