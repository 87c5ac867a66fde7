"""Start-up and shutdown of local servers: tests, benchmarks and scripts all run real
servers on 127.0.0.1 and must neither hang on one nor leave one behind."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

# Below Linux's range for outgoing connections (32768-60999): a port the OS hands out
# (bind to port 0) can be taken by a client connection in the seconds before its server
# binds it, which failed a test once the suite started many servers at a time.
SERVER_PORTS = range(20_000, 32_000)
_LAST_PORT = Path(tempfile.gettempdir()) / "chatbot-devtools-last-port"

LOCAL = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
"""The client for every request that the tools and tests send to a local server.
``httpx.get`` and ``httpx.post`` make a client per call, and its TLS context (the CA
bundle read and parsed, though these servers speak plain HTTP) took 54 ms of CPU,
against 0.4 ms for a request through a kept client: 12 s of the shared lane's pytest
process, whose waits poll a server up to 20 times a second. No connection is kept, so each
request connects afresh, as those calls did: a server restarted or killed under a test
leaves no stale connection behind. httpx's clients may be shared between threads."""


def service_info(url: str) -> dict[str, Any]:
    """The service's ``/info``: its model, precision, kernels and decode step."""
    return LOCAL.post(f"{url}/info", json={}, timeout=30).json()


def service_metrics(url: str) -> str:
    """The service's ``/metrics``, in Prometheus' text format."""
    return LOCAL.get(f"{url}/metrics", timeout=30).text


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, handed out in turn (under a file
    lock) so that processes starting servers at the same time never get the same one."""
    with _LAST_PORT.open("a+") as record:
        fcntl.flock(record, fcntl.LOCK_EX)
        record.seek(0)
        last = int(record.read().strip() or SERVER_PORTS.start)
        for step in range(1, len(SERVER_PORTS) + 1):
            port = SERVER_PORTS[(last - SERVER_PORTS.start + step) % len(SERVER_PORTS)]
            if _bindable(port):
                break
        record.seek(0)
        record.truncate()
        record.write(str(port))
    return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until_healthy(health_url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Return once ``health_url`` answers 200; fail fast if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if LOCAL.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{health_url} not healthy after {timeout_s:.0f}s")


def wait_while_compiling(url: str, limit_s: float = 600) -> None:
    """Until the service's one-row step is compiled or given up (``/info``'s
    ``decode_step``): the first start on a machine compiles it in the background, and
    the benchmark measures the step the service settles on."""
    deadline = time.monotonic() + limit_s
    while service_info(url)["decode_step"] == "compiling":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the one-row step was still compiling after {limit_s:.0f} s")
        time.sleep(1)


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and every process under it (BentoML workers start their own sessions,
    so a process group is not enough); empty once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(process: subprocess.Popen, grace_s: float = 30) -> None:
    """Terminate a server and every process under it; kill what is left after
    ``grace_s``."""
    tree = process_tree(process.pid)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        proc.kill()
    process.wait(timeout=grace_s)
