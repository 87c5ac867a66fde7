"""Fresh Python processes whose oneDNN (and ATen) are capped at an instruction-set
level: how one CPU checks the kernels as every older CPU would run them. oneDNN reads
its cap once, so each level needs a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from chatbot.engine.cpu import LEVELS, cpu_flags, level_of

HERE = Path(__file__).parent


def levels_of_this_cpu() -> list[str]:
    """Every instruction-set level this CPU can be capped to (oneDNN's cap names)."""
    flags = cpu_flags()
    best = level_of(flags)
    older = LEVELS[: LEVELS.index(best) + 1] if best else ()
    return [level for level in older if level != "avx2_vnni" or "avx_vnni" in flags]


def start_capped(level: str, *command: str) -> subprocess.Popen[str]:
    """``python command...`` in a fresh process whose oneDNN is capped at ``level``, and
    ATen's own vector code (int4's kernel) at AVX2 when ``level`` is an AVX2 one."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": level.upper(), "PYTHONPATH": str(HERE.parent)}
    if level.startswith("avx2"):
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    return subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def run_capped(level: str, *command: str) -> subprocess.CompletedProcess[str]:
    process = start_capped(level, *command)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def probes(level: str) -> list[dict]:
    """The probe's findings at ``level``: every kernel but bfloat16's, then (AVX-512)
    bfloat16's as the service runs them; both processes at once."""
    probe = str(HERE / "kernel_probe.py")
    commands = [[probe], [probe, "--bfloat16"]] if "512" in level else [[probe]]
    running = [start_capped(level, *command) for command in commands]
    found = []
    for process in running:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        found.append(json.loads(stdout))
    return found


def probes_of_every_level() -> dict[str, list[dict]]:
    """``probes`` at each level this CPU has, one level at a time (conftest runs this
    in the background while other tests run)."""
    return {level: probes(level) for level in levels_of_this_cpu()}
