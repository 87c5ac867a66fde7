"""The page's schema migrations (Alembic), run by the store when it opens.

By hand, against ``CHATBOT_DATABASE_URL`` (or the default SQLite file)::

    alembic -c frontend/alembic.ini current
    alembic -c frontend/alembic.ini upgrade head
    alembic -c frontend/alembic.ini revision -m "what changes"   # a new migration
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

HERE = Path(__file__).resolve().parent
# Any number 64-bit number the page owns: PostgreSQL's advisory lock key for migrating.
_MIGRATION_LOCK = 0x63686174_70616765  # "chatpage"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    return config


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest schema. Page copies that start together take
    turns (a PostgreSQL advisory lock held for the transaction): the first migrates,
    the others then find nothing to do."""
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
