"""Start-up and shutdown of local servers: tests, benchmarks and scripts all run real
servers on 127.0.0.1 and must neither hang on one nor leave one behind."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(health_url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Return once ``health_url`` answers 200; fail fast if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{health_url} not healthy after {timeout_s:.0f}s")


def stop_tree(process: subprocess.Popen, grace_s: float = 30) -> None:
    """Terminate a server and every process under it (BentoML workers start their own
    sessions, so a process group is not enough); kill what is left after ``grace_s``."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        proc.kill()
    process.wait(timeout=grace_s)
