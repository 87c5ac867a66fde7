"""The engine's own C kernels (``*.c`` beside this file), compiled when first used.

Three jobs in a decode step of many rows were many small torch operations, each a pass
over memory and a call's cost: attention once per reply (``attention``), the int8
activations' quantization and scaling, about eight operations around each product
(``int8``), and a beam step's copies of key/value rows, a gather and a scatter per
buffer (``slots``). Plain C with OpenMP does each in one call and one pass. The C compiler
that AOTInductor already needs builds them in about 0.3 s, into a temporary folder,
for the instruction set ``cpu.cpu_isa`` names (so ``ONEDNN_MAX_CPU_ISA=AVX2`` runs
AVX2 code here too). Without a compiler, or where it fails, ``library`` is None and
torch's operations serve instead (the log says so).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from chatbot.engine.kernels.cpu import at_least

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
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
    """Every source compiled into one library and loaded, or None (no C compiler, or
    one that failed)."""
    common = compile_command()
    if common is None:
        logger.warning("no C compiler: torch's operations serve (slower)")
        return None
    with tempfile.TemporaryDirectory() as folder:
        objects = [str(Path(folder) / f"{name}.o") for name in SOURCES]
        commands = [
            [*common, *flags, "-c", str(HERE / name), "-o", built]
            for (name, flags), built in zip(SOURCES.items(), objects, strict=True)
        ]
        shared = str(Path(folder) / "kernels.so")
        commands.append([*common, "-shared", *objects, "-o", shared])
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                logger.warning("C kernels did not compile, torch serves: %s", done.stderr)
                return None
        loaded = ctypes.CDLL(shared)  # mapped: the file may go
    for name, arguments in SIGNATURES.items():
        function = getattr(loaded, name)
        function.argtypes, function.restype = arguments, None
    return loaded
