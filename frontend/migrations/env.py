"""Alembic's entry point: migrate the connection the store hands over, or, from the
command line, the database the page would use (``CHATBOT_DATABASE_URL``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from frontend.schema import metadata


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    given = context.config.attributes.get("connection")
    if given is not None:
        run(given)
        return
    from frontend.store import connect, database_url  # the command line: the page's database

    with connect(database_url()).begin() as connection:
        run(connection)


main()
