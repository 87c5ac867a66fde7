"""Shared fixtures: a tiny offline Blenderbot, its engine, and a real server on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatbot.engine import ChatEngine
from chatbot.tiny_model import build_tiny_checkpoint
from devtools.processes import free_port, stop_tree, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
REAL_TOKENIZER = ROOT.parent / "shared" / "blenderbot-tokenizer" / "blenderbot-400M-distill"


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
        wait_until_healthy(f"{url}/readyz", process)
        yield url
    finally:
        stop_tree(process)
        log.close()
