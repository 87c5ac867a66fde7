"""The page's store on both databases it supports: SQLite (the default, in ``make
check``) and a real PostgreSQL server that the suite starts (``server`` layer)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from devtools.postgres import new_database
from frontend.migrations import alembic_config
from frontend.schema import metadata
from frontend.store import ChatStore, sqlite_url

# Written by the page's store as it was before Alembic (commit 69e6e9b's
# frontend/store.py): three owners, a deleted conversation, stopped and truncated
# replies, one reply left "writing" by a page that died, an empty conversation.
BEFORE_ALEMBIC = Path(__file__).parent / "data" / "page-before-alembic.sqlite3"
ALICE = "user:http://issuer.example:alice@example.com"


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database: a SQLite file, or one on the session's PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "conversations.sqlite3")
    return new_database(request.getfixturevalue("postgres"))


def rows(path: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(path) as raw:
        return {
            "conversations": raw.execute(
                "SELECT id, created_at, owner, public_id FROM conversations ORDER BY id"
            ).fetchall(),
            "messages": raw.execute(
                "SELECT id, conversation_id, role, content, created_at, truncated, state"
                " FROM messages ORDER BY id"
            ).fetchall(),
        }


def test_a_file_written_before_alembic_keeps_every_message_and_owner(tmp_path):
    path = tmp_path / "conversations.sqlite3"
    shutil.copy(BEFORE_ALEMBIC, path)
    before = rows(path)
    assert len(before["messages"]) == 16
    assert {r[2] for r in before["conversations"]} == {
        ALICE, "browser:" + "b" * 43, "browser:" + "o" * 43,
    }  # fmt: skip

    db = ChatStore(sqlite_url(path))
    assert rows(path) == before  # every row as it was, to the byte
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
    (alices,) = db.conversations(ALICE)
    assert db.find(alices.public_id, ALICE) == alices.id
    assert db.find(alices.public_id, "browser:" + "b" * 43) is None
    thread = db.messages(alices.id)
    assert [m.content for m in thread][:2] == ["Hello! 👋 Ça va?", "reply 0 to Hello! 👋 Ç ✓"]
    assert [m.truncated for m in thread] == [False, False, False, True, False, False]
    # The reply a dead page left "writing" reads as stopped, with what it wrote.
    (others,) = db.conversations("browser:" + "o" * 43)
    assert (db.messages(others.id)[-1].content, db.messages(others.id)[-1].state) == (
        "half a rep",
        "stopped",
    )
    assert db.new_conversation(ALICE).id == 6  # ids are never reused (1 was deleted)
    db.delete(alices.id, ALICE)
    assert db.messages(alices.id) == []  # the old file's ON DELETE CASCADE still holds


def test_migrations_go_down_and_up_again_without_loss(tmp_path, monkeypatch):
    path = tmp_path / "conversations.sqlite3"
    shutil.copy(BEFORE_ALEMBIC, path)
    ChatStore(sqlite_url(path))
    before = rows(path)
    monkeypatch.setenv("CHATBOT_DATABASE_URL", sqlite_url(path))  # as `alembic -c ...` runs
    command.downgrade(alembic_config(), "0001")
    assert rows(path) == before
    command.upgrade(alembic_config(), "head")
    assert rows(path) == before


def test_a_new_database_has_exactly_the_schema_the_store_uses(database):
    db = ChatStore(database)
    with db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, metadata) == []


def test_owners_see_only_their_own(database):
    db = ChatStore(database)
    mine, theirs = db.new_conversation("browser:me"), db.new_conversation("browser:them")
    db.add(mine.id, "user", "my secret ✓")
    assert [c.title for c in db.conversations("browser:me")] == ["my secret ✓"]
    assert db.find(mine.public_id, "browser:them") is None
    db.delete(mine.id, "browser:them")  # not theirs: nothing happens
    assert len(db.messages(mine.id)) == 1
    assert [c.id for c in db.conversations("browser:them")] == [theirs.id]


def test_a_reply_can_be_stopped_from_another_copy_and_is_stopped_when_its_writer_dies(
    database,
):
    writer, other = ChatStore(database, lease_s=0.6), ChatStore(database, lease_s=0.6)
    conversation = writer.new_conversation("browser:me").id
    reply = writer.add(conversation, "assistant", "", state="writing")
    with writer.kept_alive(reply):
        assert writer.grow_reply(reply, "Once upon")
        time.sleep(1.0)  # past the lease: touched meanwhile, so still being written
        assert other.messages(conversation)[-1].state == "writing"
        other.request_stop(reply)
        assert not writer.grow_reply(reply, "Once upon a time")
    writer.update_reply(reply, "Once upon a time", "stopped")
    assert (other.reply(reply).content, other.reply(reply).state) == (
        "Once upon a time",
        "stopped",
    )

    abandoned = writer.add(conversation, "assistant", "", state="writing")
    assert writer.grow_reply(abandoned, "half")  # ... and then its page copy dies
    assert other.reply(abandoned).state == "writing"
    time.sleep(0.7)
    assert (other.reply(abandoned).content, other.reply(abandoned).state) == ("half", "stopped")
    assert not writer.grow_reply(abandoned, "half a reply")  # a late writer stops too


def test_concurrent_writes_from_two_copies_lose_nothing(database):
    copies = [ChatStore(database), ChatStore(database)]
    conversation = copies[0].new_conversation("browser:me").id

    def write(copy: ChatStore, writer: int) -> None:
        for i in range(40):
            copy.add(conversation, "user", f"{writer}-{i}")

    threads = [
        threading.Thread(target=write, args=(copies[n % 2], n)) for n in range(6)
    ]  # three writers on each copy
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    said = [m.content for m in copies[1].messages(conversation)]
    assert sorted(said) == sorted(f"{w}-{i}" for w in range(6) for i in range(40))
    for w in range(6):  # each writer's messages in the order it wrote them
        assert [s for s in said if s.startswith(f"{w}-")] == [f"{w}-{i}" for i in range(40)]


def test_copies_starting_together_migrate_once(postgres):
    url = new_database(postgres)
    failures: list[BaseException] = []

    def start() -> None:
        try:
            ChatStore(url)
        except Exception as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    with ChatStore(url).engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [
            ("0002",)
        ]
