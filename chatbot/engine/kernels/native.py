"""The engine's own kernels: C (``*.c`` beside this file) and C++ operators
(``operators.cpp``), each compiled once per machine into the user's cache.

Three jobs in a decode step of many rows were many small torch operations, each a pass
over memory and a call's cost: attention once per reply (``attention``), the int8
activations' quantization and scaling, about eight operations around each product
(``int8``), and a beam step's copies of key/value rows, a gather and a scatter per
buffer (``slots``). Plain C with OpenMP does each in one call and one pass. The C compiler
that AOTInductor already needs builds them in about 0.7 s, for the instruction set
``cpu.cpu_isa`` names (so ``ONEDNN_MAX_CPU_ISA=AVX2`` runs AVX2 code here too, from a
library of its own). That was once paid at every start, by every server, replica and
build process; now the first process builds, the others load the file in milliseconds.
Without a C compiler, or where it fails, ``library`` is None and torch's operations
serve instead (the log says so); without a cache folder to write, it is built in a
temporary folder at every start, as it once was.

``operators.cpp`` gives the engine's operators that a compiled step calls back
(``chatbot::attend_rows``, ``chatbot::int8_fbgemm``) C++ kernels, so those calls need no
Python. Built against torch's headers it takes about 10 s, for every instruction set
alike (it calls the C library's attention through a pointer). A process that finds it
in the cache loads it at once; one that does not (a new replica: a Kubernetes pod
starts with an empty cache) builds it in a thread and serves with the operators'
Python kernels meanwhile, then loads it where no operator can be running
(``operators``: before a compiled step is attached). A new replica of the tiny model
was ready in 5.2-6.5 s instead of 12.2 s (4.6-4.8 s with the library cached). Without
a C++ compiler or a cache folder to write, the Python kernels serve (the log says so).

Both are named by what built them (sources, compiler flags, torch's version), so a
change builds a new library beside the old ones (``prune_libraries``).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import torch

from chatbot.engine.cpu import at_least
from chatbot.settings import used_longest_ago, user_cache

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
TORCH = Path(torch.__file__).parent
OPERATORS = "operators.cpp"
SOURCES = {"attention.c": [], "quantize.c": ["-ffp-contract=off"], "reorder.c": []}
"""Each source and its own flags: ``quantize.c`` must round every operation as torch
does (no fused multiply-adds)."""

_I64, _POINTER, _FLOAT, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "attend_rows": [_POINTER, _I64, _I64, _POINTER, _POINTER, _INT, _I64, _I64, _I64,
                    _POINTER, _POINTER, _I64, _I64, _I64, _I64, _FLOAT, _POINTER, _INT,
                    _POINTER, _I64],
    "quantize_rows": [_POINTER, _I64, _I64, _I64, _FLOAT, _INT, _POINTER, _POINTER, _INT],
    "scale_rows": [_POINTER, _I64, _I64, _POINTER, _POINTER, _INT],
    "copy_spans": [_POINTER, _I64, _I64, _I64, _I64, _I64, _POINTER, _POINTER, _POINTER, _I64,
                   _I64, _POINTER, _INT],
}  # fmt: skip


def isa_flags() -> list[str]:
    """The compiler's instruction set: the one oneDNN's kernels use (``cpu_isa``)."""
    if at_least("avx512_core"):
        return ["-march=x86-64-v4"]
    if at_least("avx2"):
        return ["-march=x86-64-v3"]
    return []


def compile_command() -> list[str] | None:
    """The C compiler and the flags every source gets, or None (no C compiler)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    return None if compiler is None else [compiler, "-O3", *isa_flags(), "-fopenmp", "-fPIC"]


@cache
def library() -> ctypes.CDLL | None:
    """Every C source compiled into one library (``cached``) and loaded, then
    ``operators.cpp``'s library loaded from the cache or built in the background
    (``_Operators.start``); or None (no C compiler, or one that failed)."""
    common = compile_command()
    if common is None:
        logger.warning("no C compiler: torch's operations serve (slower)")
        return None
    sources = b"".join((HERE / name).read_bytes() for name in SOURCES)
    build = partial(_build_kernels, common)
    try:
        built = cached("kernels", sources + repr([common, SOURCES]).encode(), build)
        loaded = None if built is None else ctypes.CDLL(str(built))
    except OSError as error:
        logger.warning("the C kernels' cache failed, built for this start: %s", error)
        with tempfile.TemporaryDirectory() as folder:
            shared = Path(folder) / "kernels.so"
            loaded = ctypes.CDLL(str(shared)) if build(shared) else None  # mapped: may go
    if loaded is None:
        return None
    for name, arguments in SIGNATURES.items():
        function = getattr(loaded, name)
        function.argtypes, function.restype = arguments, None
    _OPERATORS.start(loaded)
    return loaded


def _build_kernels(common: list[str], shared: Path) -> bool:
    """Each C source compiled beside ``shared``, then linked into it."""
    objects = [str(shared.with_name(f"{name}.o")) for name in SOURCES]
    commands = [
        [*common, *flags, "-c", str(HERE / name), "-o", built]
        for (name, flags), built in zip(SOURCES.items(), objects, strict=True)
    ]
    commands.append([*common, "-shared", *objects, "-o", str(shared)])
    return all(
        _compiles(command, "C kernels did not compile, torch serves") for command in commands
    )


def operators_command() -> list[str] | None:
    """The C++ compiler and the flags ``operators.cpp`` gets (torch's headers and ABI),
    or None (no C++ compiler)."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return None
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    headers = TORCH / "include"
    return [compiler, "-O2", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{headers}", f"-I{headers / 'torch/csrc/api/include'}"]  # fmt: skip


def operators() -> bool:
    """Whether ``operators.cpp``'s kernels serve the engine's operators: loaded now if
    they are not yet, after waiting for their build (``operators_library``) where it
    is still under way.

    Call it only where no ``chatbot::`` operator can be running: loading the library
    registers kernels for them, which must not race a call through the dispatcher.
    Only traced and compiled steps call them through it (``attention.attending``), and a
    compiled step is attached after this call (``compiled_step.attach``)."""
    kernels = library()
    return kernels is not None and _OPERATORS.load(kernels)


def operators_loaded() -> bool:
    """Whether ``operators.cpp``'s kernels serve (``operators``), without loading them."""
    return _OPERATORS.loaded


def when_operators_load(callback: Callable[[], None]) -> None:
    """``callback()`` once ``operators.cpp``'s library is loaded: now if it is."""
    _OPERATORS.callbacks.append(callback)
    if _OPERATORS.loaded:
        callback()


class _Operators:
    """``operators.cpp``'s library in this process. Found in the cache, it is loaded at
    once (``library``). Not there, it is built in a thread (about 10 s of a core, niced),
    so a new replica gets ready as soon as one with a cache: a Kubernetes pod starts
    with an empty one. The library is loaded later, where it is safe (``operators``)."""

    def __init__(self) -> None:
        self.loaded = False
        self.callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._building: threading.Thread | None = None
        self._built: Path | None = None

    def start(self, kernels: ctypes.CDLL) -> None:
        command = operators_command()
        if command is None:
            logger.warning("no C++ compiler: the engine's operators are Python's (slower calls)")
            return
        try:
            found = cached_library("operators", _operators_key(command))
        except OSError:
            found = None  # ``operators_library`` will say why
        if found is not None:
            self._built = found
            self.load(kernels)
            return
        logger.info("operators.cpp is built in the background; Python's kernels serve meanwhile")
        self._building = threading.Thread(target=self._build, name="build operators.cpp")
        self._building.start()  # not a daemon: a build is never left half done

    def _build(self) -> None:
        self._built = operators_library(niceness=BUILD_NICENESS)

    def load(self, kernels: ctypes.CDLL) -> bool:
        with self._lock:
            if self.loaded:
                return True
            if self._building is not None:
                self._building.join()
            elif self._built is None:
                self._built = operators_library()
            if self._built is None:
                return False
            attention = ctypes.cast(kernels.attend_rows, ctypes.c_void_p)
            ctypes.CDLL(str(self._built)).use_attention(attention)
            self.loaded = True
        for callback in self.callbacks:
            callback()
        return True


_OPERATORS = _Operators()

BUILD_NICENESS = 10
"""The background build's: a replica that has started serving keeps its cores."""


def operators_library(niceness: int = 0) -> Path | None:
    """``operators.cpp``'s library in the user's cache (``cached``; built there first,
    at ``niceness``, if it is not), or None (the log says why)."""
    command = operators_command()
    if command is None:
        return None
    try:
        return cached(
            "operators",
            _operators_key(command),
            partial(_build_operators, command, niceness),
        )
    except OSError as error:
        logger.warning("no cache folder for operators.cpp, Python's kernels serve: %s", error)
        return None


def _operators_key(command: list[str]) -> bytes:
    """What names a build of ``operators.cpp``: its source, its command, torch."""
    return (HERE / OPERATORS).read_bytes() + repr([command, torch.__version__]).encode()


KEPT_LIBRARIES = 6
"""Builds of each library the cache keeps (up to 150 KB each): every source or torch
change builds another, each instruction set its own C library (``ONEDNN_MAX_CPU_ISA``),
and a few venvs on other torch versions may share the cache."""


BUILDING = "building-"
"""The prefix of a build's temporary folder in the cache."""


def cached(stem: str, key: bytes, build: Callable[[Path], bool]) -> Path | None:
    """The library ``stem`` that ``key`` (its sources and commands) names, in the user's
    cache: built there first if it is not (one process builds, the others wait for it,
    and find a finished file), or None where ``build`` failed. OSError: no cache. A
    library already there is found without the lock, which a build holds for seconds."""
    path = _library_path(stem, key)
    if _used(path):
        return path
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _used(path):
            return path
        prune_libraries(folder, stem, KEPT_LIBRARIES - 1)
        for stale in folder.glob(f"{BUILDING}*"):  # a killed process's, as builds hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=BUILDING) as building:
            built = Path(building) / path.name
            return built.replace(path) if build(built) else None


def cached_library(stem: str, key: bytes) -> Path | None:
    """The library ``stem`` that ``key`` names, if the cache has it (built whole:
    a build is moved in when done). OSError: no cache."""
    path = _library_path(stem, key)
    return path if _used(path) else None


def _used(path: Path) -> bool:
    """Whether the library ``path`` is built; touched if it is (used: the last to go,
    ``prune_libraries``)."""
    if not path.exists():
        return False
    path.touch()
    return True


def _library_path(stem: str, key: bytes) -> Path:
    digest = hashlib.blake2b(key, digest_size=12).hexdigest()
    return Path(user_cache()) / "kernels" / f"{stem}-{digest}.so"


def prune_libraries(folder: Path, stem: str, keep: int) -> None:
    """Delete all but the ``keep`` libraries ``stem`` of ``folder`` used last. A process
    that has one loaded keeps its mapping: the file is only unlinked."""
    for old in used_longest_ago(folder.glob(f"{stem}-*.so"), keep):
        old.unlink(missing_ok=True)


def _build_operators(command: list[str], niceness: int, built: Path) -> bool:
    """``operators.cpp`` compiled and linked against torch's libraries into ``built``."""
    lib = TORCH / "lib"
    link = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_cpu", "-lc10"]
    compiling = [*command, "-shared", str(HERE / OPERATORS), *link, "-o", str(built)]
    failure = "operators.cpp did not compile, Python's kernels serve"
    return _compiles(compiling, failure, niceness)


def _compiles(command: list[str], failure: str, niceness: int = 0) -> bool:
    """Whether ``command`` succeeds (run at ``niceness``); where it fails, the log says
    ``failure`` and the end of the compiler's message (C++ template errors run to pages)."""
    if niceness and (nice := shutil.which("nice")):
        command = [nice, "-n", str(niceness), *command]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        logger.warning("%s: %s", failure, done.stderr[-2000:])
    return done.returncode == 0
