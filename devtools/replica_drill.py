"""Two replicas of the service behind a real load balancer (HAProxy), under steady load:
restarted one at a time, then one killed. What a Kubernetes rolling update and a
crashed pod do to the clients, on one machine.

HAProxy health-checks each replica's ``/readyz`` every half second, as a readiness
probe does, takes a replica out at its first broken connection, and sends a request
whose connection is refused (a replica gone or not yet listening) to the other one.
The load comes through two routes (backends) that differ in one policy:

- ``plain`` (HAProxy's default): a request that reached a replica is never sent
  twice. When that replica dies, HAProxy answers its client at once: a 502 on a new
  client connection or, on a kept-alive one, the connection closed without a response
  (HTTP/1.1's "not answered, safe to retry"; httpx raises ``RemoteProtocolError``).
- ``retrying``: such a request is sent to the other replica instead. A reply changes
  nothing on the server, so that is safe here, and no client sees the crash.

    python -m devtools.replica_drill   (make drill: the tiny model, about a minute)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devtools.processes import free_port, process_tree, stop_tree, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 6  # steady load: this many clients a route, each sending its next request at once
ROUTES = ("retrying", "plain")  # the balancer's two policies (HAPROXY_CONFIG)
REQUEST = {"messages": [{"role": "user", "content": "are you still there?"}],
           "num_beams": 1, "max_new_tokens": 24}  # fmt: skip
CLIENT_TIMEOUT_S = 60.0  # a request that hangs fails the drill instead of stalling it

HAPROXY_CONFIG = """\
global
    maxconn 1024
    stats socket {stats} mode 600 level admin
    log stderr format raw local0 notice
defaults
    mode http
    log global
    # Only requests that went wrong are logged, each with its termination state (which
    # side closed, at what stage): the drill's report quotes them.
    option httplog
    option dontlog-normal
    option log-separate-errors
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    # Idle client connections: well under the service's CHATBOT_KEEP_ALIVE_S (620 s),
    # so that the balancer, not the replica, closes an idle connection to it.
    timeout http-keep-alive 60s
    retries 3
    option redispatch 1
    balance leastconn
    option httpchk GET /readyz
    # A replica whose connection breaks is taken out at once, not at its next check.
    # Three missed checks in a row (each may take 5 s on a busy machine) take it out too.
    timeout check 5s
    default-server inter 500ms fall 3 rise 2 observe layer4 error-limit 1 on-error mark-down
frontend retrying
    bind 127.0.0.1:{retrying_port}
    default_backend retrying
frontend plain
    bind 127.0.0.1:{plain_port}
    default_backend plain
backend retrying
    http-response set-header X-Replica %s
    # A reply changes nothing on the server, so a request whose replica closed or died
    # before answering is sent to another (the body is buffered for that).
    retry-on conn-failure empty-response
    option http-buffer-request
{servers}
backend plain
    http-response set-header X-Replica %s
    # Only a request that never reached a replica is sent again: HAProxy's default.
    retry-on conn-failure
{servers}
"""


@dataclass
class Outcome:
    start: float
    end: float
    status: str  # an HTTP status code, or the name of a connection error
    route: str  # the balancer's backend: "retrying" or "plain"
    replica: str = ""  # which replica answered (HAProxy's X-Replica), if one did


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    note: str = ""


@dataclass
class Drill:
    """The requests sent and the events, on one clock (``time.monotonic``)."""

    outcomes: list[Outcome] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    out_of_balancer: float = 0.0  # when HAProxy had taken the killed replica out
    balancer_errors: list[str] = field(default_factory=list)  # HAProxy's log of them

    def during(self, phase: Phase) -> list[Outcome]:
        """The requests that ended in ``phase``: what it did to them."""
        return [o for o in self.outcomes if phase.start <= o.end < phase.end]

    def report(self) -> str:
        lines = []
        for phase in self.phases:
            lines.append(f"{phase.name} ({phase.end - phase.start:.1f} s) {phase.note}")
            for route in ROUTES:
                ended = [o for o in self.during(phase) if o.route == route]
                failed = Counter(o.status for o in ended if o.status != "200")
                slowest = max((o.end - o.start for o in ended), default=0.0)
                lines.append(
                    f"    {route:<9} answered {len(ended):4d}, failed {sum(failed.values()):2d} "
                    f"{dict(failed) or ''} slowest {slowest:.2f} s"
                )
        lines += ["HAProxy's log of the requests that went wrong:", *self.balancer_errors]
        return "\n".join(lines)


class Replica:
    """One ``bentoml serve`` of the service, restartable on its own port."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.env, self.port = name, env, free_port()
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.log_dir / f"{self.name}.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", "service:Chatbot",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_until_healthy(f"http://127.0.0.1:{self.port}/readyz", self.process)

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes stops a pod: replies in flight finish first."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)

    def kill(self) -> int:
        """SIGKILL to every process of the replica at once, as a crashed node."""
        assert self.process is not None
        tree = process_tree(self.process.pid)
        for process in tree:
            process.kill()
        self.process.wait(timeout=30)
        return len(tree)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_tree(self.process)


def haproxy_path() -> str | None:
    """Debian's haproxy (``make balancer``): on the PATH, or in /usr/sbin, which a
    non-root PATH lacks."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")


class Balancer:
    """HAProxy in front of the replicas, on its own port."""

    def __init__(self, replicas: list[Replica], work_dir: Path) -> None:
        self.ports = {route: free_port() for route in ROUTES}
        self.stats, self.log = work_dir / "haproxy.sock", work_dir / "haproxy.log"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
        ports = {f"{route}_port": port for route, port in self.ports.items()}
        config = work_dir / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(stats=self.stats, servers=servers, **ports))
        haproxy = haproxy_path()
        if haproxy is None:
            raise RuntimeError("haproxy is not installed (make balancer)")
        self.process = subprocess.Popen(
            [haproxy, "-f", str(config), "-db"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("wb"),
        )  # fmt: skip

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.ports[route]}"

    def command(self, line: str) -> str:
        """One command on HAProxy's runtime API (its stats socket)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats))
            sock.sendall(line.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()

    def set_state(self, replica: Replica, state: str) -> None:
        """``maint``: no new request goes there (a Kubernetes endpoint removed as its pod
        starts terminating); ``ready``: back, once its health checks pass."""
        for route in ROUTES:
            self.command(f"set server {route}/{replica.name} state {state}")

    def states_of(self, replica: Replica) -> set[str]:
        """The replica's state in each backend, as HAProxy sees it (UP, DOWN, MAINT...)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.process.returncode}: see {self.log}")
        try:
            table = self.command("show stat")
        except (FileNotFoundError, ConnectionRefusedError):  # still starting
            return set()
        rows = [line.split(",") for line in table.splitlines() if line]
        name, status = rows[0].index("svname"), rows[0].index("status")
        return {row[status] for row in rows[1:] if row[0] in ROUTES and row[name] == replica.name}

    def wait_until(self, replica: Replica, state: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.states_of(replica) != {state}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"HAProxy never saw {replica.name} {state}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def request_errors(self) -> list[str]:
        """The log lines of requests that went wrong (``option dontlog-normal``), not
        the lines of health-check events."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if ' HTTP/1.1"' in line]


class SteadyLoad:
    """``CLIENTS`` clients through each of the balancer's routes, each client with its
    own pooled connection, in a thread of its own, until stopped."""

    def __init__(self, balancer: Balancer, drill: Drill) -> None:
        self.balancer, self.drill, self.stopping = balancer, drill, threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(r) for r in ROUTES for _ in range(CLIENTS)))

    async def _client(self, route: str) -> None:
        url = self.balancer.url(route)
        async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
            while not self.stopping.is_set():
                start = time.monotonic()
                try:
                    response = await client.post("/respond", json=REQUEST)
                    status, replica = (
                        str(response.status_code),
                        response.headers.get("x-replica", ""),
                    )
                except httpx.HTTPError as error:
                    status, replica = type(error).__name__, ""
                self.drill.outcomes.append(Outcome(start, time.monotonic(), status, route, replica))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=CLIENT_TIMEOUT_S + 10)


@contextmanager
def phase(drill: Drill, name: str) -> Iterator[Phase]:
    current = Phase(name, time.monotonic())
    drill.phases.append(current)
    try:
        yield current
    finally:
        current.end = time.monotonic()


STEADY_S = 3.0  # load with both replicas up, before and after the events
# A stopping replica leaves the balancer first, then gets SIGTERM: what the pod's preStop
# sleep gives Kubernetes' endpoints (10 s there). Without it, HAProxy sent a request on
# an idle connection the stopping server was closing at that moment: 1 of 8 clients a
# restart got a 502, or its connection dropped.
PRE_STOP_S = 1.0


def hold_steady(drill: Drill, since: float, replicas: set[str]) -> None:
    """Keep the load on ``STEADY_S``, and longer until every route and each of
    ``replicas`` has answered a request sent after ``since``: on a busy machine a reply
    can take longer than the phase, and a phase with no reply shows nothing (one did,
    beside ``make test``'s other lane). Gives up after ``CLIENT_TIMEOUT_S``; the
    drill's checks then say what was missing."""
    time.sleep(STEADY_S)
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while time.monotonic() < deadline:
        answered = [o for o in list(drill.outcomes) if o.start > since]
        routes, by = {o.route for o in answered}, {o.replica for o in answered}
        if routes == set(ROUTES) and replicas <= by:
            return
        time.sleep(0.1)


def run_drill(env: dict[str, str], work_dir: Path) -> Drill:
    """Both replicas up behind the balancer; steady load; restart each in turn (out of
    the balancer, SIGTERM, started again, back in once ready, then the next); then
    SIGKILL one."""
    replicas = [Replica(f"r{i}", env, work_dir) for i in range(2)]
    balancer, load, drill = None, None, Drill()
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        balancer = Balancer(replicas, work_dir)
        for replica in replicas:
            balancer.wait_until(replica, "UP")
        load = SteadyLoad(balancer, drill)
        with phase(drill, "steady, both up") as steady:
            hold_steady(drill, steady.start, {"r0", "r1"})
        for replica in replicas:
            with phase(drill, f"restart {replica.name} (SIGTERM)") as restart:
                balancer.set_state(replica, "maint")
                time.sleep(PRE_STOP_S)
                replica.terminate()
                down_at = time.monotonic()
                replica.start()
                replica.wait_ready()
                balancer.set_state(replica, "ready")
                balancer.wait_until(replica, "UP")
                restart.note = f"{time.monotonic() - down_at:.1f} s until back in the balancer"
        with phase(drill, "steady, both up again") as steady_again:
            hold_steady(drill, steady_again.start, {"r0", "r1"})
        with phase(drill, "SIGKILL r0") as killed:
            processes = replicas[0].kill()
            balancer.wait_until(replicas[0], "DOWN")
            drill.out_of_balancer = time.monotonic()
            killed.note = f"{processes} processes killed, out of the balancer after " + (
                f"{drill.out_of_balancer - killed.start:.2f} s"
            )
            hold_steady(drill, drill.out_of_balancer, {"r1"})
        return drill
    finally:
        if load is not None:
            load.stop()
        if balancer is not None:
            balancer.stop()
            drill.balancer_errors = balancer.request_errors()
        for replica in replicas:
            replica.stop()


def tiny_model_env(work_dir: Path) -> dict[str, str]:
    """A model store of its own holding the tiny test model (``make drill``)."""
    from chatbot.models.tiny_model import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(work_dir / "tiny-blenderbot")
    env = {**os.environ, "BENTOML_HOME": str(work_dir / "bentoml"), "HF_HUB_OFFLINE": "1",
           "CHATBOT_MODEL": str(checkpoint), "BENTOML_DO_NOT_TRACK": "True",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    tag = subprocess.run(
        [sys.executable, "import_model.py"], cwd=ROOT, env=env,
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return {**env, "CHATBOT_MODEL_TAG": tag}


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        drill = run_drill(tiny_model_env(Path(work)), Path(work))
    print(drill.report())


if __name__ == "__main__":
    main()
