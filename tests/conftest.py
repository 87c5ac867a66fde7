"""Shared fixtures: a tiny offline Blenderbot, its engine, and a real server on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatbot.engine import ChatEngine
from chatbot.tiny_model import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
REAL_TOKENIZER = ROOT.parent / "shared" / "blenderbot-tokenizer" / "blenderbot-400M-distill"
SERVER_START_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-blenderbot")


@pytest.fixture(scope="session")
def engine(tiny_checkpoint: Path) -> ChatEngine:
    return ChatEngine.load(tiny_checkpoint, "tiny-blenderbot")


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    if not (REAL_TOKENIZER / "vocab.json").exists():
        pytest.skip(f"real Blenderbot tokenizer not found at {REAL_TOKENIZER}")
    return REAL_TOKENIZER


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_env(bentoml_home: Path, model: Path | str) -> dict[str, str]:
    """Environment for subprocesses: own model store, no hub access."""
    return {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "CHATBOT_MODEL": str(model),
        "HF_HUB_OFFLINE": "1",
        "BENTOML_DO_NOT_TRACK": "True",
    }


def import_model(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "import_model.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_until_ready(
    url: str, process: subprocess.Popen[bytes], health_path: str = "/readyz"
) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}{health_path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {SERVER_START_TIMEOUT_S}s")


@pytest.fixture(scope="session")
def server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The real ``bentoml serve`` on the tiny model, bound to 127.0.0.1 only."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = offline_env(home, tiny_checkpoint)
    imported = import_model(env)
    assert imported.returncode == 0, imported.stderr
    env["CHATBOT_MODEL_TAG"] = imported.stdout.strip()
    port = free_port()
    log = (home / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service:Chatbot",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
