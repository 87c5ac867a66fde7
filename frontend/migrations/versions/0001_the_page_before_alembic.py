"""The page's schema as its last hand-migrated version (before Alembic) left it.

A new database gets the tables. A database that an earlier page wrote (it has the
tables, but no Alembic version) gets the columns that versions added after it, as
the page's old hand-written migration gave them: owners (NULL until the first
visitor claims them), unguessable link ids for every conversation, and a reply state.
No row is touched otherwise.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ADDED_LATER = {  # columns that page versions added, for databases written before them
    "conversations": [sa.Column("owner", sa.Text), sa.Column("public_id", sa.Text)],
    "messages": [sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'done'"))],
}


def upgrade() -> None:
    tables = set(sa.inspect(op.get_bind()).get_table_names())
    if "conversations" not in tables:
        create_tables()
    else:
        add_missing_columns()
    give_every_conversation_a_link()
    if not index_exists("conversations", "conversations_public_id"):
        op.create_index("conversations_public_id", "conversations", ["public_id"], unique=True)


def create_tables() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.Text, nullable=False),
        *ADDED_LATER["conversations"],
        sqlite_autoincrement=True,
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "conversation_id",
            sa.Integer,
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "role", sa.Text, sa.CheckConstraint("role IN ('user', 'assistant')"), nullable=False
        ),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False, server_default=sa.false()),
        *ADDED_LATER["messages"],
    )


def add_missing_columns() -> None:
    inspector = sa.inspect(op.get_bind())
    for table, columns in ADDED_LATER.items():
        present = {column["name"] for column in inspector.get_columns(table)}
        for column in columns:
            if column.name not in present:
                op.add_column(table, column.copy())


def give_every_conversation_a_link() -> None:
    bind = op.get_bind()
    unlinked = bind.execute(sa.text("SELECT id FROM conversations WHERE public_id IS NULL"))
    for (conversation,) in unlinked.fetchall():
        bind.execute(
            sa.text("UPDATE conversations SET public_id = :link WHERE id = :id"),
            {"link": secrets.token_urlsafe(16), "id": conversation},
        )


def index_exists(table: str, name: str) -> bool:
    return any(i["name"] == name for i in sa.inspect(op.get_bind()).get_indexes(table))


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("conversations")
