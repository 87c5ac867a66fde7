"""Shared fixtures: a tiny offline Blenderbot, its engine, and a real server on it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from chatbot.engine import ChatEngine
from chatbot.tiny_model import build_tiny_chat_checkpoint, build_tiny_checkpoint
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
def tiny_chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoder-only chat model (Llama with a ChatML template), random weights."""
    return build_tiny_chat_checkpoint(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="session")
def chat_engine(tiny_chat_checkpoint: Path) -> ChatEngine:
    return ChatEngine.load(tiny_chat_checkpoint, "tiny-chat")


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
    """A BentoML home holding one imported model, shared by every server on it."""

    env: dict[str, str]


@dataclass(frozen=True)
class Served:
    url: str
    process: subprocess.Popen
    log: Path


def stored(model: Path, home: Path) -> ModelStore:
    """A BentoML home holding ``model`` (a checkpoint directory or GGUF file)."""
    env = offline_env(home, model)
    imported = import_model(env)
    assert imported.returncode == 0, imported.stderr
    return ModelStore({**env, "CHATBOT_MODEL_TAG": imported.stdout.strip()})


@pytest.fixture(scope="session")
def model_store(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return stored(tiny_checkpoint, tmp_path_factory.mktemp("bentoml-home"))


@pytest.fixture(scope="session")
def chat_model_store(
    tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> ModelStore:
    return stored(tiny_chat_checkpoint, tmp_path_factory.mktemp("bentoml-home"))


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


def batch_sizes(server: str) -> Counter[int]:
    """How many model batches of each size (conversations per ``generate`` call) so far."""
    metrics = httpx.get(f"{server}/metrics", timeout=10).text
    buckets = {
        float(le): float(count)
        for le, count in re.findall(
            r'chatbot_batch_conversations_bucket\{le="([\d.]+)"\} ([\d.]+)',
            metrics,
        )
    }
    sizes, previous = Counter(), 0.0
    for le in sorted(buckets):
        sizes[int(le)] = int(buckets[le] - previous)
        previous = buckets[le]
    return sizes


def build_bento(
    checkpoint: Path, home: Path, bentofile: str = "bentofile.yaml"
) -> tuple[dict[str, str], str]:
    """``make bento``'s steps: import the model, build with its tag as argument."""
    env = offline_env(home, checkpoint)
    imported = import_model(env)
    assert imported.returncode == 0, imported.stderr
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", bentofile,
         "--arg", f"model_tag={imported.stdout.strip()}", "-o", "tag"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    del env["CHATBOT_MODEL"]  # the Bento must not need it
    return env, build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


# --- the container image, built in the background ---------------------------------------

CAN_BUILD_IMAGES = bool(
    os.geteuid() == 0 and shutil.which("buildah") and shutil.which("debootstrap")
)
CONTAINER_ENV = {"STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
IMAGE_TEST = "test_the_image_built_from_the_bento_answers_a_chat"


@dataclass(frozen=True)
class BuiltImage:
    name: str
    env: dict[str, str]


def build_image(checkpoint: Path, home: Path) -> BuiltImage:
    """``make image`` without Docker: a local base image, the Bento, then
    ``bentoml containerize`` with buildah."""
    base = subprocess.run(
        [str(ROOT / "scripts" / "build_base_image.sh")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert base.returncode == 0, base.stderr
    env, bento = build_bento(checkpoint, home, "deploy/bentofile.local-image.yaml")
    env |= CONTAINER_ENV
    image = f"localhost/{bento}"
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "containerize", bento, "--backend", "buildah", "-t", image],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return BuiltImage(image, env)


@pytest.fixture(scope="session")
def image_build(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future[BuiltImage]]:
    """The image, building in a thread while the other tests run: the build mostly
    waits on downloads and the disk, so the suite is about 3 minutes shorter."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(build_image, tiny_checkpoint, tmp_path_factory.mktemp("image-home"))


@pytest.fixture(scope="session", autouse=True)
def start_the_image_build_first(request: pytest.FixtureRequest) -> None:
    if CAN_BUILD_IMAGES and any(item.name == IMAGE_TEST for item in request.session.items):
        request.getfixturevalue("image_build")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``last`` run last (stable: the others keep their order)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)
