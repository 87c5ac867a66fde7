"""Which precision a ``CHATBOT_DTYPE`` value means on this machine, decided without torch.

The service's supervisor (``bentoml serve``'s first process) checks the setting before
it starts a worker, so that a precision the machine cannot run stops the service with
a message instead of a worker that fails again and again. Importing torch for that cost
the supervisor 2.7 s of CPU at every start (a third of a replica's time to ready on a
2-core EPYC); the workers import it anyway. ``chatbot.engine.precision`` turns the name
chosen here into the kernels that compute it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from chatbot.engine.cpu import WITHOUT_AMX, at_least, cpu_isa, run_without_amx

logger = logging.getLogger(__name__)

CPU_ONLY = frozenset({"int8", "int4"})
"""Precisions of the engine's own CPU kernels, which have no GPU counterpart."""

GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
"""NVIDIA's, AMD's (ROCm) and WSL2's GPU driver nodes: without one, torch finds no GPU
either."""


class UnsupportedPrecision(ValueError):
    """The device cannot run the precision asked for; the message says why."""


def gpu_present() -> bool:
    """Whether the engine loads models on a GPU. torch is asked only where a GPU
    driver's device node exists, so a CPU machine decides without importing it."""
    if not any(Path(node).exists() for node in GPU_DEVICE_NODES):
        return False
    import torch

    return torch.cuda.is_available()


def choose(name: str, on_gpu: bool, four_bit_source: bool = False) -> str:
    """The precision ``name`` (a ``CHATBOT_DTYPE`` value) means: ``auto`` resolved, a
    precision the device cannot run refused (``UnsupportedPrecision``). Why ``auto``
    picks what it picks: ``chatbot.engine.precision.resolve``."""
    if on_gpu:
        return _on_gpu(name)
    if name == "auto":
        return _auto_on_cpu(four_bit_source)
    if name == "bfloat16":
        _check_bfloat16()
    return name


def prepare_process(name: str) -> None:
    """What this process must do before its first kernel to serve the precision
    ``name`` (``choose``'s): cap oneDNN below AMX for the bfloat16 kernels
    (``run_without_amx``). The service calls it; it changes the process's environment,
    which its children (the workers, a compile) inherit."""
    if name == "bfloat16":
        run_without_amx()


def _auto_on_cpu(four_bit_source: bool) -> str:
    if four_bit_source:
        return "int4"
    return "bfloat16" if cpu_isa() == WITHOUT_AMX else "float32"


def _on_gpu(name: str) -> str:
    if name in CPU_ONLY:
        raise UnsupportedPrecision(
            f"CHATBOT_DTYPE={name} is a CPU precision; on a GPU use bfloat16, float16 or auto"
        )
    if name != "auto":
        return name
    import torch

    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return "bfloat16" if native_bf16 else "float16"


def _check_bfloat16() -> None:
    """oneDNN packs bfloat16 weights from AVX-512 (BW, VL, DQ) on, and multiplies them
    natively with AVX512_BF16 or AMX; in between it emulates, about 5x slower."""
    isa = cpu_isa() or "older than avx2"
    if not at_least("avx512_core"):
        raise UnsupportedPrecision(
            f"CHATBOT_DTYPE=bfloat16 needs a CPU with AVX-512 (this one runs {isa}); "
            "use float32 or int8"
        )
    if not at_least("avx512_core_bf16"):
        logger.warning(
            "CHATBOT_DTYPE=bfloat16 on %s: no AVX512_BF16 or AMX, so oneDNN emulates "
            "bfloat16 (about 5x slower than native); float32 or int8 will be faster",
            isa,
        )
