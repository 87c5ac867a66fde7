"""Shared fixtures: a tiny offline Blenderbot, its engine, and a real server on it;
the test layers (markers) and the slow work that runs in the background."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from capped import probes_of_every_level

from chatbot.engine.gc_freeze import frozen_after_loading
from chatbot.models.offline_model import offline_model_path
from devtools.chat_page import CHROMIUM, CHROMIUM_ARGS
from devtools.postgres import running_postgres, server_bin
from devtools.processes import free_port, service_metrics, stop_tree, wait_until_healthy

if TYPE_CHECKING:  # torch and the engine load where used: ``pytest -n``'s controller
    # reads this file too, and needs neither (10 s before the workers start)
    from chatbot.engine.chat_engine import ChatEngine

ROOT = Path(__file__).resolve().parent.parent
# Built once for every pytest process of a run, and kept for the next (``built_once``).
TINY_MODELS = ROOT / ".cache" / "tiny-models"
REAL_TOKENIZER = ROOT.parent / "shared" / "blenderbot-tokenizer" / "blenderbot-400M-distill"


def pytest_configure(config: pytest.Config) -> None:
    """One compute thread per process, this one and every server it starts.

    The suite runs several processes at once on two cores (a server and its client,
    builds in the background). A tiny model gains nothing from a second thread, and an
    OpenMP thread that waits on a preempted sibling spins: measured with one busy core
    beside it, 24 concurrent replies took 2.69 s with two threads and 0.70 s with one.
    """
    os.environ["OMP_NUM_THREADS"] = "1"  # read as torch loads, with the first test module


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """The test modules (torch, transformers, Streamlit...) imported as a server loads
    its engine (``chatbot.engine.gc_freeze``): what they make lives as long as pytest."""
    with frozen_after_loading():
        return (yield)


@pytest.fixture(scope="session", autouse=True)
def one_compute_thread() -> None:
    """This process's part of ``pytest_configure``'s promise, whatever loaded torch first."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from chatbot.models.tiny_model import built_once

    return built_once("encoder-decoder", TINY_MODELS)


@pytest.fixture(scope="session")
def engine(tiny_checkpoint: Path) -> ChatEngine:
    from chatbot.engine.chat_engine import ChatEngine

    return ChatEngine.load(tiny_checkpoint, "tiny-blenderbot")


@pytest.fixture(scope="session")
def tiny_chat_checkpoint() -> Path:
    """A decoder-only chat model (Llama with a ChatML template), random weights."""
    from chatbot.models.tiny_model import built_once

    return built_once("decoder-only", TINY_MODELS)


@pytest.fixture(scope="session")
def chat_engine(tiny_chat_checkpoint: Path) -> ChatEngine:
    from chatbot.engine.chat_engine import ChatEngine

    return ChatEngine.load(tiny_chat_checkpoint, "tiny-chat")


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    if not (REAL_TOKENIZER / "vocab.json").exists():
        pytest.skip(f"real Blenderbot tokenizer not found at {REAL_TOKENIZER}")
    return REAL_TOKENIZER


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def offline_env(bentoml_home: Path, model: Path | str) -> dict[str, str]:
    """Environment for subprocesses: own model store, no hub access."""
    return {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "CHATBOT_MODEL": str(model),
        # Off: each server would compile its own step on the suite's two cores. `make
        # run`'s test builds and serves one (test_offline_model), test_compiled_step
        # attaches Blenderbot's to a decode loop.
        "CHATBOT_COMPILE_STEP": "false",
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

    def ready(self) -> Served:
        """Wait until it answers (it may have been started early)."""
        assert_in_server_layer()
        wait_until_healthy(f"{self.url}/readyz", self.process)
        return self


def stored(model: Path, home: Path) -> ModelStore:
    """A BentoML home holding ``model`` (a checkpoint directory or GGUF file)."""
    env = offline_env(home, model)
    imported = import_model(env)
    assert imported.returncode == 0, imported.stderr
    return ModelStore({**env, "CHATBOT_MODEL_TAG": imported.stdout.strip()})


def home_linked_to(store: ModelStore, directory: Path) -> Path:
    """A BentoML home of its own (a server wipes its metrics directory at start) whose
    model store links to ``store``'s."""
    home = directory / "bentoml-home"
    home.mkdir()
    (home / "models").symlink_to(Path(store.env["BENTOML_HOME"]) / "models")
    return home


@pytest.fixture(scope="session")
def model_store(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return stored(tiny_checkpoint, tmp_path_factory.mktemp("bentoml-home"))


@pytest.fixture(scope="session")
def chat_model_store(
    tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> ModelStore:
    return stored(tiny_chat_checkpoint, tmp_path_factory.mktemp("bentoml-home"))


def start_server(store: ModelStore, log_dir: Path, **settings: str) -> Served:
    """The real ``bentoml serve`` on a stored model, bound to 127.0.0.1 only, with
    extra environment ``settings``; started, not yet ready (``Served.ready``).

    Each server gets its own BentoML home linked to the shared model store.
    """
    home = home_linked_to(store, log_dir)
    port = free_port()
    log_path = log_dir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:Chatbot",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**store.env, "BENTOML_HOME": str(home), **settings},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return Served(f"http://127.0.0.1:{port}", process, log_path)


@contextmanager
def serving(store: ModelStore, log_dir: Path, **settings: str) -> Iterator[Served]:
    """``start_server``, ready; stopped (whole process tree) on exit."""
    running = start_server(store, log_dir, **settings)
    try:
        yield running.ready()
    finally:
        stop_tree(running.process)


# --- the servers the suite shares -----------------------------------------------------------
# Starting ``bentoml serve`` takes 15 to 25 s, mostly one core importing torch and
# transformers. Each server below starts as the session starts, if a selected test
# needs it, so those starts overlap each other and the first tests; a test waits only
# for the one it uses to be ready. Idle, they cost memory only.

API_KEY = "test-key-4f1c9a"  # a made-up key: the tests look for it in the logs
SHARED_SERVERS: dict[str, tuple[str, dict[str, str]]] = {  # name: (model store, settings)
    # The default settings (continuous batching), for every test that only reads.
    "served": ("model_store", {}),
    # BentoML's adaptive batching of whole replies instead of the decode loop.
    # In float32: a padded generate batch attends over its longest row, which sums in
    # another order than a reply alone; float32 keeps such replies equal in practice,
    # bfloat16 and int8 round the difference into other tokens (README, Precision).
    "adaptive": ("model_store", {"CHATBOT_BATCHING": "adaptive", "CHATBOT_DTYPE": "float32"}),
    # A decode loop with room for 2 rows and 1 waiting reply.
    "small_loop": ("model_store", {"CHATBOT_MAX_ROWS": "2", "CHATBOT_MAX_WAITING": "1"}),
    # The tiny decoder-only chat model (Llama + ChatML template).
    "chat_model": ("chat_model_store", {}),
    # An API key, room for 2 requests at a time, a 0.5 s timeout.
    "guarded": (
        "model_store",
        {"CHATBOT_API_KEY": API_KEY, "CHATBOT_MAX_CONCURRENCY": "2", "CHATBOT_TIMEOUT_S": "0.5"},
    ),
    # An API key and one request at a time, no short timeout (so the chat page's
    # back-off can be watched from start to success).
    "single_slot": ("model_store", {"CHATBOT_API_KEY": API_KEY, "CHATBOT_MAX_CONCURRENCY": "1"}),
    "int8_served": ("model_store", {"CHATBOT_DTYPE": "int8"}),
    # Default settings, for the one test that stops it.
    "served_to_stop": ("model_store", {}),
}


class Servers:
    """The shared servers, each started once (early, see above) and stopped at the end."""

    def __init__(self, request: pytest.FixtureRequest, logs: pytest.TempPathFactory) -> None:
        self.request, self.logs, self.started = request, logs, dict[str, Served]()

    def start(self, name: str) -> Served:
        if name not in self.started:
            store_fixture, settings = SHARED_SERVERS[name]
            store = self.request.getfixturevalue(store_fixture)
            self.started[name] = start_server(store, self.logs.mktemp(name), **settings)
        return self.started[name]

    def stop_all(self) -> None:
        """All at once: each may take its grace period to finish what it is doing."""
        with ThreadPoolExecutor() as pool:
            list(pool.map(stop_tree, [running.process for running in self.started.values()]))


@pytest.fixture(scope="session")
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    shared = Servers(request, tmp_path_factory)
    yield shared
    shared.stop_all()


@pytest.fixture(scope="session")
def served(servers: Servers) -> Served:
    return servers.start("served").ready()


@pytest.fixture(scope="session")
def chat_model(servers: Servers) -> Served:
    return servers.start("chat_model").ready()


@pytest.fixture(scope="session")
def guarded(servers: Servers) -> Served:
    return servers.start("guarded").ready()


@pytest.fixture(scope="session")
def single_slot(servers: Servers) -> Served:
    return servers.start("single_slot").ready()


@pytest.fixture(scope="session")
def int8_served(servers: Servers) -> Served:
    return servers.start("int8_served").ready()


@pytest.fixture
def served_to_stop(servers: Servers) -> Served:
    return servers.start("served_to_stop").ready()


@pytest.fixture(scope="session")
def server(served: Served) -> str:
    return served.url


@pytest.fixture
def adaptive(servers: Servers) -> str:
    return servers.start("adaptive").ready().url


@pytest.fixture
def small_loop(servers: Servers) -> str:
    return servers.start("small_loop").ready().url


@pytest.fixture(params=["served", "adaptive"], ids=["continuous", "adaptive"])
def either_batching(request: pytest.FixtureRequest, servers: Servers) -> str:
    """The service with each CHATBOT_BATCHING mode."""
    return servers.start(request.param).ready().url


def histogram(server: str, name: str) -> Counter[int]:
    """Observations so far of the histogram ``name``, by bucket upper bound."""
    metrics = service_metrics(server)
    pattern = rf'{name}_bucket\{{le="([\d.]+)"\}} ([\d.]+)'
    buckets = {float(le): float(count) for le, count in re.findall(pattern, metrics)}
    sizes, previous = Counter(), 0.0
    for le in sorted(buckets):
        sizes[int(le)] = int(buckets[le] - previous)
        previous = buckets[le]
    return sizes


def batch_sizes(server: str) -> Counter[int]:
    """How many model batches of each size so far: rows per decode step (continuous
    batching), or conversations per ``generate`` call (adaptive); a server feeds one."""
    return histogram(server, "chatbot_rows_per_step") + histogram(
        server, "chatbot_batch_conversations"
    )


def build_bento(
    store: ModelStore, directory: Path, bentofile: str = "bentofile.yaml"
) -> tuple[dict[str, str], str]:
    """``make bento``'s build, on the model ``store`` holds (imported as ``make bento``
    imports it), in a BentoML home of its own in ``directory``."""
    env = {**store.env, "BENTOML_HOME": str(home_linked_to(store, directory))}
    tag = env.pop("CHATBOT_MODEL_TAG")  # an argument of the build, not the Bento's setting
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", bentofile,
         "--arg", f"model_tag={tag}", "-o", "tag"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    del env["CHATBOT_MODEL"]  # the Bento must not need it
    return env, build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def in_progress(url: str, endpoint: str) -> int:
    """Requests to ``endpoint`` that the server at ``url`` is answering right now."""
    metrics = service_metrics(url)
    found = re.search(
        rf'bentoml_service_request_in_progress{{endpoint="{re.escape(endpoint)}"[^}}]*}} ([\d.]+)',
        metrics,
    )
    return int(float(found.group(1))) if found else 0


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll ``condition`` until it holds: a test waits for a state, never for a guessed
    time, so a busy machine makes it slower, not wrong."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout_s:.0f} s for {what}"
        time.sleep(0.05)


# --- slow work in the background ----------------------------------------------------------
# The kernel probes (``make check``), building the Bento and the image, ``make run``
# offline (its GGUF conversion first) and the benchmark's smoke run take minutes of
# mostly waiting (downloads, disk, process start-ups) or of one core, and share no
# state or measurement with the other tests. Each starts in a
# background thread when the session starts, if a selected test needs it; the build and
# benchmark tests are marked ``last``, so by then their work is done.


@pytest.fixture(scope="session")
def background() -> Iterator[ThreadPoolExecutor]:
    """Two threads: the image build, which takes longest, and the rest in turn."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="background") as pool:
        yield pool
        pool.shutdown(cancel_futures=True)


CAN_BUILD_IMAGES = bool(
    os.geteuid() == 0 and shutil.which("buildah") and shutil.which("mmdebstrap")
)
OFFLINE_MODEL = offline_model_path()
SERVER_JOBS = {  # in the order they start, each with whether it can run here
    "image_build": CAN_BUILD_IMAGES,
    "offline_run": OFFLINE_MODEL is not None,
    "bento_build": True,
    "bench_run": True,
}
BACKGROUND_JOBS = {"kernel_probes": True, **SERVER_JOBS}  # the probes: make check's


@pytest.fixture(scope="session", autouse=True)
def start_early(request: pytest.FixtureRequest) -> None:
    """Start the shared servers, then the background jobs, that selected tests need.

    Not in a worker of ``pytest -n`` (``make check``): each collects every test but runs
    only those handed to it, and two workers already keep both cores busy; a job starts
    when a test there asks for it."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    needed = {name for item in request.session.items for name in item.fixturenames}
    for name in [name for name in SHARED_SERVERS if name in needed]:
        request.getfixturevalue("servers").start(name)
    for job, possible in BACKGROUND_JOBS.items():
        if possible and job in needed:
            request.getfixturevalue(job)


@dataclass(frozen=True)
class MakeRun:
    url: str
    page_url: str
    process: subprocess.Popen
    log: Path

    def ready(self) -> MakeRun:
        assert_in_server_layer()
        wait_until_healthy(f"{self.url}/readyz", self.process, timeout_s=300)
        wait_until_healthy(f"{self.page_url}/_stcore/health", self.process)
        return self


def start_make_run(tmp: Path) -> MakeRun:
    """``make run`` (``scripts/run.sh``) on a machine that cannot reach the hub.

    SmolLM2-135M-Instruct's GGUF file is first converted into a model store by the
    same ``import_model.py`` that ``make run`` calls (a minute's work, once per test
    run); ``make run`` then finds it there, as on a user's second run.
    """
    assert OFFLINE_MODEL is not None
    home = home_linked_to(stored(OFFLINE_MODEL, tmp / "converted"), tmp)
    port, page_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_")}
    env.update(
        HF_HUB_OFFLINE="1", BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True",
        PORT=str(port), STREAMLIT_SERVER_PORT=str(page_port), CHATBOT_DATA_DIR=str(tmp / "data"),
        CHATBOT_COMPILE_CACHE=str(tmp / "compiled-steps"),  # a first start: it compiles
        # The one-row layers only: SmolLM2's batch layers would add 100 s of CPU to a
        # suite that is CPU-bound on 2 cores. Batch packages are built and checked
        # against generate on Blenderbot (test_compiled_step) and verified on Llama.
        CHATBOT_COMPILE_BATCHES="false",
    )  # fmt: skip
    log = tmp / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "scripts/run.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return MakeRun(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{page_port}", process, log)


@pytest.fixture(scope="session")
def offline_run(
    background: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future[MakeRun]]:
    started = background.submit(start_make_run, tmp_path_factory.mktemp("make-run"))
    yield started
    if not started.cancelled() and started.exception() is None:
        stop_tree(started.result().process)


@pytest.fixture(scope="session")
def kernel_probes(background: ThreadPoolExecutor) -> Future[dict[str, list[dict]]]:
    """The row-independence probe at every instruction-set level (``tests/capped.py``):
    a minute of fresh processes, each on one core, while the other tests use the other."""
    return background.submit(probes_of_every_level)


@pytest.fixture(scope="session")
def bento_build(
    background: ThreadPoolExecutor,
    model_store: ModelStore,
    tmp_path_factory: pytest.TempPathFactory,
) -> Future[tuple[dict[str, str], str]]:
    """``make bento`` on the tiny model: (environment, Bento tag)."""
    return background.submit(build_bento, model_store, tmp_path_factory.mktemp("bento"))


@dataclass(frozen=True)
class BenchRun:
    finished: Future[subprocess.CompletedProcess[str]]
    out: Path


@pytest.fixture(scope="session")
def bench_run(background: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory) -> BenchRun:
    """``make bench ARGS="--quick --model tiny --dtype float32"``: the harness, not its
    numbers (float32: where adaptive batching's replies equal the loop's too)."""
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable,
        "benchmarks/bench.py",
        "--quick",
        "--model",
        "tiny",
        "--dtype",
        "float32",
    ]
    finished = background.submit(
        subprocess.run,
        [*command, "--out", str(out)],
        cwd=ROOT,
        # Its service would compile its step (into ~/.cache) beside the other lane.
        env={**os.environ, "CHATBOT_COMPILE_STEP": "false"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    return BenchRun(finished, out)


# --- the container image -------------------------------------------------------------------

# As ``make image``: each step's layer kept, so a rebuild reuses what did not change.
CONTAINER_ENV = {"BUILDAH_ISOLATION": "chroot", "BUILDAH_LAYERS": "true"}


@dataclass(frozen=True)
class BuiltImage:
    name: str
    env: dict[str, str]


def build_image(store: ModelStore, directory: Path) -> BuiltImage:
    """``make image`` without Docker: a local base image, the Bento, then
    ``bentoml containerize`` with buildah."""
    base = subprocess.run(
        [str(ROOT / "scripts" / "build_base_image.sh")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert base.returncode == 0, base.stderr
    env, bento = build_bento(store, directory, "deploy/bentofile.local-image.yaml")
    env |= CONTAINER_ENV
    image = f"localhost/{bento}"
    containerize = ["containerize", bento, "--backend", "buildah", "-t", image]
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", *containerize],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    remove_images_but(image, env)
    return BuiltImage(image, env)


def remove_images_but(image: str, env: dict[str, str]) -> None:
    """Every other build of ``image``'s repository: ``image`` stays, since removing it
    would remove the layers the next build reuses (CONTAINER_ENV); each earlier one
    holds only what its own Bento added on top of them."""
    repository = image.split(":")[0]
    listed = subprocess.run(
        ["buildah", "images", "--format", "{{.Name}}:{{.Tag}}"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    others = [name for name in listed if name.split(":")[0] == repository and name != image]
    if others:
        subprocess.run(["buildah", "rmi", *others], env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def image_build(
    background: ThreadPoolExecutor,
    model_store: ModelStore,
    tmp_path_factory: pytest.TempPathFactory,
) -> Future[BuiltImage]:
    return background.submit(build_image, model_store, tmp_path_factory.mktemp("image"))


# --- page processes -------------------------------------------------------------------------


@contextmanager
def running(command: list[str], port: int, health: str, **popen: Any) -> Iterator[str]:
    """``command`` started (its output dropped), answering on 127.0.0.1:``port`` once
    ``health`` does; its whole process tree stopped on exit."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url + health, process)
        yield url
    finally:
        stop_tree(process)


@pytest.fixture(scope="module")
def oidc_provider() -> Iterator[str]:
    """A real OpenID Connect provider (oidc-provider-mock) on 127.0.0.1: its login
    form takes any user name."""
    port = free_port()
    command = [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port"]
    with running([*command, str(port)], port, "/.well-known/openid-configuration") as url:
        yield url


# --- the page's database ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server (Debian's, ``make database``) for this session: its
    URL. Each test makes its own database on it (``devtools.postgres.new_database``)."""
    if server_bin() is None:
        pytest.skip("PostgreSQL is not installed (make database)")
    with running_postgres() as url:
        yield url


# --- layers ----------------------------------------------------------------------------------

# A test that uses one of these starts real processes: it belongs to the ``server`` layer.
SERVER_FIXTURES = frozenset(
    {
        "model_store",
        "chat_model_store",
        "server",
        "either_batching",
        "postgres",
        *SHARED_SERVERS,
        *SERVER_JOBS,
    }
)


_running: list[pytest.Item] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


def assert_in_server_layer() -> None:
    """Keep ``make check`` fast: a server started for a test outside the ``server``
    layer (one that asks for its server by name, say) fails that test with a hint."""
    for item in _running:
        assert item.get_closest_marker("server"), (
            f"{item.nodeid} starts a server: mark it (or its module) @pytest.mark.server"
        )


# ``make test`` runs the server layer as two pytest processes at once, one per lane
# (``--lane``, scripts/test_lanes.sh), each mostly one process waiting on another: the
# tests on the shared servers, and those that need processes of their own (builds, the
# benchmark, ``make run``, model imports). Each process starts only its own lane's
# servers. The soak is the shared lane's last test (see the script).
LANES = ("shared-servers", "own-processes")
OWN_PROCESS_MODULES = frozenset(
    {
        "test_bench.py",
        "test_compiled_step.py",  # its one server test builds packages in a subprocess
        "test_deploy.py",
        "test_import_model.py",
        "test_offline_model.py",
        "test_page_copies.py",
        "test_replica_drill.py",
        "test_settings.py",  # a real `bentoml serve` that must refuse to start
    }
)


def lane_of(module: Path) -> str:
    return "own-processes" if module.name in OWN_PROCESS_MODULES else "shared-servers"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A lane collects its own modules only: importing the other lane's (schemathesis,
    Streamlit's test harness, the deployment schemas) cost each lane seconds of CPU."""
    lane = config.getoption("lane")
    module = collection_path.name.startswith("test_") and collection_path.suffix == ".py"
    return True if lane and module and lane_of(collection_path) != lane else None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lane", choices=LANES, help="run only this lane's tests")
    parser.addoption(
        "--soak-requests", type=int, default=600,
        help="requests of each soak after its warm-up (the long soak: 5000 or more)",
    )  # fmt: skip


def uses_a_server(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    parameters = callspec.params.values() if callspec else ()
    return bool(
        SERVER_FIXTURES.intersection(item.fixturenames)
        or item.get_closest_marker("browser")
        or any(isinstance(p, str) and p in SERVER_FIXTURES for p in parameters)
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the ``server`` layer (every test that needs a real process of its own: a
    browser test too, or one given a parameter named after a server fixture), and run
    tests marked ``last`` last, the others in their order."""
    for item in items:
        if uses_a_server(item):
            item.add_marker(pytest.mark.server)
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)
