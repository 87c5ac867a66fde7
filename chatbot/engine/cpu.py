"""Which instruction set the CPU kernels run on: what the CPU has, capped the way oneDNN
caps itself.

oneDNN (torch's CPU kernels for packed layers) picks its code by instruction set, and
honours ``ONEDNN_MAX_CPU_ISA`` (older name ``DNNL_MAX_CPU_ISA``): one AVX-512 machine can
run as an AVX2 one, which is how the tests check every level the machine has. Levels are
named as oneDNN names them, lower-cased, oldest first.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

LEVELS = (
    "avx2",
    "avx2_vnni",
    "avx512_core",
    "avx512_core_vnni",
    "avx512_core_bf16",
    "avx512_core_amx",
)

# The /proc/cpuinfo flags each level needs, on top of the previous level's.
_FLAGS = {
    "avx2": {"avx2", "fma"},
    "avx2_vnni": {"avx_vnni"},
    "avx512_core": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_core_vnni": {"avx512_vnni"},
    "avx512_core_bf16": {"avx512_bf16"},
    "avx512_core_amx": {"amx_tile", "amx_int8", "amx_bf16"},
}

# oneDNN's own cap names that are not a level's name (newer names of the same sets).
_CAP_ALIASES = {
    "avx10_1_512": "avx512_core_bf16",
    "avx512_core_fp16": "avx512_core_bf16",
    "avx10_1_512_amx": "avx512_core_amx",
    "avx10_1_512_amx_fp16": "avx512_core_amx",
    "avx512_core_amx_fp16": "avx512_core_amx",
}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def level_of(flags: frozenset[str]) -> str | None:
    """The newest level whose flags (and every older level's) the CPU has."""
    best = None
    for level in LEVELS:
        if not _FLAGS[level] <= flags:
            if level == "avx2_vnni":  # AVX-512 CPUs need not have AVX-VNNI
                continue
            break
        best = level
    return best


def capped(level: str | None, cap: str) -> str | None:
    """``level`` lowered to oneDNN's cap (``ONEDNN_MAX_CPU_ISA``'s value)."""
    cap = _CAP_ALIASES.get(cap.lower(), cap.lower())
    if level is None or cap in ("", "all", "default"):
        return level
    if cap not in LEVELS:  # a level older than AVX2 (SSE41, AVX)
        return None
    return min(level, cap, key=LEVELS.index)


@cache
def cpu_isa() -> str | None:
    """The instruction set oneDNN's kernels use in this process (None: older than AVX2)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return capped(level_of(cpu_flags()), cap)


def at_least(level: str) -> bool:
    isa = cpu_isa()
    return isa is not None and LEVELS.index(isa) >= LEVELS.index(level)


WITHOUT_AMX = "avx512_core_bf16"


def run_without_amx() -> None:
    """Cap this process's oneDNN below AMX, where bfloat16 products depend on the rows
    beside them.

    On a Xeon with AMX, oneDNN multiplies up to 32 rows with AVX512_BF16 and more with
    AMX tiles, which sum in another order; for 5120 inputs the result of a row kept
    changing up to 233 rows. A reply would then differ with what shares its batch.
    Capped at AVX512_BF16 every row count agrees (as on CPUs without AMX), at the
    cost of AMX's speed on large batches (128 rows: 2.2 ms instead of 14 for a
    1280x5120 layer). oneDNN reads the cap once, at its first kernel: the service calls
    this (through ``precision_names.prepare_process``) before it loads the model. int8 keeps AMX:
    its integer sums are exact, whatever the kernel.
    """
    if cpu_isa() == "avx512_core_amx":
        os.environ["ONEDNN_MAX_CPU_ISA"] = WITHOUT_AMX.upper()
        cpu_isa.cache_clear()
