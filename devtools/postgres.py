"""A throwaway PostgreSQL server on 127.0.0.1, from Debian's ``postgresql`` package
(``make database`` installs it): the tests' real database, and a quick one to try
several page copies against.

    python -m devtools.postgres      # prints CHATBOT_DATABASE_URL=...; Ctrl-C removes it

PostgreSQL refuses to run as root, so under root the server runs as the package's
``postgres`` user, in a data directory given to it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

from devtools.processes import free_port, stop_tree

DATABASE = "chat"


def server_bin() -> Path | None:
    """The newest installed server's bin directory, if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: p.parts)
    return found[-1].parent if found else None


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def _run(command: list[str]) -> None:
    done = subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {done.stderr.strip() or done.stdout.strip()}")


@contextlib.contextmanager
def running_postgres(timeout_s: float = 60) -> Iterator[str]:
    """A fresh server with an empty database; its SQLAlchemy URL. Stopped and
    deleted on exit."""
    bin_dir = server_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (make database)")
    home = Path(tempfile.mkdtemp(prefix="chatbot-postgres-"))
    if os.geteuid() == 0:
        server_user = pwd.getpwnam("postgres")
        os.chown(home, server_user.pw_uid, server_user.pw_gid)
    data, port = home / "data", free_port()
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "--encoding=UTF8", "--no-sync"])  # fmt: skip
        server = subprocess.Popen(
            _as_server_user(
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(data),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-k",
                    str(home),
                    "-c",
                    "fsync=off",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until_ready(bin_dir, port, server, timeout_s)
            _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                  "-U", "postgres", DATABASE])  # fmt: skip
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{DATABASE}"
        finally:
            stop_tree(server, grace_s=10)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A new, empty database on the server of ``server_url``; its URL."""
    name = f"chat_{secrets.token_hex(6)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    finally:
        admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _wait_until_ready(bin_dir: Path, port: int, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    ready = [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"]
    while subprocess.run(ready, check=False).returncode != 0:
        if server.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"postgres not ready after {timeout_s:.0f}s")
        time.sleep(0.2)


def main() -> None:
    with running_postgres() as url:
        print(f"CHATBOT_DATABASE_URL={url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
