"""Shared fixtures: a tiny offline Blenderbot, its engine, and a real server on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelStore:
    """A BentoML home holding the tiny model, imported once for every test server."""

    env: dict[str, str]


@dataclass(frozen=True)
class Served:
    url: str
    process: subprocess.Popen
    log: Path


@pytest.fixture(scope="session")
def model_store(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    env = offline_env(tmp_path_factory.mktemp("bentoml-home"), tiny_checkpoint)
    imported = import_model(env)
    assert imported.returncode == 0, imported.stderr
    return ModelStore({**env, "CHATBOT_MODEL_TAG": imported.stdout.strip()})


@contextmanager
def serving(store: ModelStore, log_dir: Path, **settings: str) -> Iterator[Served]:
    """The real ``bentoml serve`` on the stored tiny model, bound to 127.0.0.1 only,
    with extra environment ``settings``; stopped (whole process tree) on exit.

    Each server gets its own BentoML home (its metrics directory is wiped at start)
    whose model store links to the shared one.
    """
    home = log_dir / "bentoml-home"
    home.mkdir()
    (home / "models").symlink_to(Path(store.env["BENTOML_HOME"]) / "models")
    port = free_port()
    log_path = log_dir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:Chatbot",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**store.env, "BENTOML_HOME": str(home), **settings},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(f"{url}/readyz", process)
            yield Served(url, process, log_path)
        finally:
            stop_tree(process)


@pytest.fixture(scope="session")
def served(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The service with its default settings, shared by the session."""
    with serving(model_store, tmp_path_factory.mktemp("served")) as running:
        yield running


@pytest.fixture(scope="session")
def server(served: Served) -> str:
    return served.url
