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
alike (it calls the C library's attention through a pointer). Without a C++ compiler
or a cache folder to write, the operators' Python kernels serve (the log says so).

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
    "attend_rows": [_POINTER, _I64, _I64, _POINTER, _POINTER, _I64, _I64, _I64, _POINTER,
                    _POINTER, _I64, _I64, _I64, _I64, _FLOAT, _POINTER, _INT, _POINTER, _I64],
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
    ``operators.cpp``'s library (``operators_library``) handed its attention kernel; or
    None (no C compiler, or one that failed)."""
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
    if (operators := operators_library()) is not None:
        ctypes.CDLL(str(operators)).use_attention(ctypes.cast(loaded.attend_rows, ctypes.c_void_p))
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


def operator(name: str) -> Callable[..., object] | None:
    """``torch.ops.chatbot.<name>``, one of ``operators.cpp``'s own, where it is loaded."""
    return None if library() is None else getattr(torch.ops.chatbot, name, None)


def operators_library() -> Path | None:
    """``operators.cpp``'s library in the user's cache (``cached``), or None (the log
    says why)."""
    command = operators_command()
    if command is None:
        logger.warning("no C++ compiler: the engine's operators are Python's (slower calls)")
        return None
    source = (HERE / OPERATORS).read_bytes()
    try:
        return cached(
            "operators",
            source + repr([command, torch.__version__]).encode(),
            partial(_build_operators, command),
        )
    except OSError as error:
        logger.warning("no cache folder for operators.cpp, Python's kernels serve: %s", error)
        return None


KEPT_LIBRARIES = 6
"""Builds of each library the cache keeps (up to 150 KB each): every source or torch
change builds another, each instruction set its own C library (``ONEDNN_MAX_CPU_ISA``),
and a few venvs on other torch versions may share the cache."""


def cached(stem: str, key: bytes, build: Callable[[Path], bool]) -> Path | None:
    """The library ``stem`` that ``key`` (its sources and commands) names, in the user's
    cache: built there first if it is not (one process builds, the others wait for it,
    and find a finished file), or None where ``build`` failed. OSError: no cache."""
    folder = Path(user_cache()) / "kernels"
    path = folder / f"{stem}-{hashlib.blake2b(key, digest_size=12).hexdigest()}.so"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            path.touch()  # used: the last to go (``prune_libraries``)
            return path
        prune_libraries(folder, stem, KEPT_LIBRARIES - 1)
        with tempfile.TemporaryDirectory(dir=folder) as building:
            built = Path(building) / path.name
            return built.replace(path) if build(built) else None


def prune_libraries(folder: Path, stem: str, keep: int) -> None:
    """Delete all but the ``keep`` libraries ``stem`` of ``folder`` used last. A process
    that has one loaded keeps its mapping: the file is only unlinked."""
    for old in used_longest_ago(folder.glob(f"{stem}-*.so"), keep):
        old.unlink(missing_ok=True)


def _build_operators(command: list[str], built: Path) -> bool:
    """``operators.cpp`` compiled and linked against torch's libraries into ``built``."""
    lib = TORCH / "lib"
    link = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_cpu", "-lc10"]
    compiling = [*command, "-shared", str(HERE / OPERATORS), *link, "-o", str(built)]
    return _compiles(compiling, "operators.cpp did not compile, Python's kernels serve")


def _compiles(command: list[str], failure: str) -> bool:
    """Whether ``command`` succeeds; where it fails, the log says ``failure`` and the
    end of the compiler's message (C++ template errors run to pages)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        logger.warning("%s: %s", failure, done.stderr[-2000:])
    return done.returncode == 0
