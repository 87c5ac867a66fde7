"""Load, faults and hostile input against the real server on the tiny model.

Bounded in requests and time, 127.0.0.1 only. The soak figures are printed (run
pytest with -s to see them) for the issue's closing note.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import psutil
import pytest
import uvicorn
from conftest import API_KEY, ROOT, Served, in_progress, wait_for
from streamlit.testing.v1 import AppTest

from benchmarks.memory import Soak, soak
from chatbot.http.keep_alive import keep_idle_connections
from devtools.processes import LOCAL, service_metrics
from frontend.client import ChatClient, ServiceError

APP = str(ROOT / "frontend" / "app.py")
SLOW = {"num_beams": 16, "max_new_tokens": 127}  # about 1 s on the tiny model, on a 2-core EPYC
FAST = {"num_beams": 1, "max_new_tokens": 2}


def chat(text: str, **options) -> dict:
    return {"messages": [{"role": "user", "content": text}], **options}


def log_lines(served: Served) -> list[dict]:
    lines = served.log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"event": "request"')]


def logged(served: Served, request_id: str, timeout_s: float = 60) -> dict:
    """The log line of one request (written just after its response is sent)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [e for e in log_lines(served) if e["request_id"] == request_id]
        if lines:
            (line,) = lines
            return line
        time.sleep(0.1)
    raise AssertionError(f"no log line for request {request_id}")


def authorized(served: Served) -> httpx.Client:
    return httpx.Client(
        base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )


def until_served(client: httpx.Client, attempts: int = 20) -> httpx.Response:
    """A fast request, repeated until the slow work still running has drained."""
    for _ in range(attempts):
        response = client.post("/respond", json=chat("still there?", **FAST))
        if response.status_code == 200:
            return response
        time.sleep(0.5)
    return response


# --- access control and logs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "route"),
    [("POST", "/respond"), ("POST", "/chat"), ("POST", "/generate"), ("POST", "/info"),
     ("POST", "/v1/chat/completions"), ("GET", "/v1/models")],
)  # fmt: skip
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", API_KEY, f"Basic {API_KEY}"])
def test_every_api_route_needs_the_bearer_key(guarded, method, route, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, f"{guarded.url}{route}", json={}, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["error"]


def test_the_right_key_is_served_and_health_and_metrics_stay_open(guarded):
    with authorized(guarded) as client:
        assert until_served(client).status_code == 200
        assert client.post("/info", json={}).json()["model"]
    # The OpenAI client sends the key the same way.
    models = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=API_KEY).models.list()
    assert len(models.data) == 1
    for path in ["/livez", "/readyz", "/healthz", "/metrics"]:
        assert LOCAL.get(f"{guarded.url}{path}", timeout=30).status_code == 200, path


def test_one_structured_log_line_per_request_without_text_or_key(guarded):
    marker = "purple-elephant-7731"
    with authorized(guarded) as client:
        response = until_served(client)
        mine = client.post(
            "/respond", json=chat(f"my secret is {marker}", **FAST),
            headers={"X-Request-ID": "trace-me-42"},
        )  # fmt: skip
    assert mine.headers["X-Request-ID"] == "trace-me-42"
    assert response.headers["X-Request-ID"]
    line = logged(guarded, "trace-me-42")
    log = guarded.log.read_text(errors="replace")
    assert marker not in log
    assert API_KEY not in log
    assert line["path"] == "/respond"
    assert line["status"] == mine.status_code
    assert line["latency_ms"] > 0
    if mine.status_code == 200:
        assert line["completion_tokens"] == mine.json()["completion_tokens"] > 0
        assert line["prompt_tokens"] == mine.json()["prompt_tokens"] > 0
    # In-process calls to /generate are part of the outer request, not lines of their
    # own (this module calls /generate from outside only without the key).
    assert all(e["status"] == 401 for e in log_lines(guarded) if e["path"] == "/generate")


# --- size limits --------------------------------------------------------------------


def test_an_oversized_body_is_refused_before_any_model_work(guarded):
    big = json.dumps(chat("x" * 2_000_000)).encode()
    with authorized(guarded) as client:
        start = time.perf_counter()
        declared = client.post(
            "/respond", content=big,
            headers={"content-type": "application/json", "X-Request-ID": "big-declared"},
        )  # fmt: skip
        streamed = client.post(  # chunked: no Content-Length to go by
            "/respond", content=iter([big[:500_000], big[500_000:]]),
            headers={"content-type": "application/json", "X-Request-ID": "big-streamed"},
        )  # fmt: skip
        assert time.perf_counter() - start < 10
    for response in (declared, streamed):
        assert response.status_code == 413
        assert "CHATBOT_MAX_BODY_BYTES" in response.json()["error"]
    for request_id in ("big-declared", "big-streamed"):
        line = logged(guarded, request_id)
        assert line["status"] == 413
        assert line["completion_tokens"] == 0


# --- overload and timeouts ----------------------------------------------------------


async def _burst(url: str, count: int, payload: dict) -> list[tuple[httpx.Response, float]]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:

        async def one() -> tuple[httpx.Response, float]:
            start = time.perf_counter()
            response = await client.post("/respond", json=payload)
            return response, time.perf_counter() - start

        return await asyncio.gather(*(one() for _ in range(count)))


def test_excess_requests_fail_fast_with_retry_after(guarded):
    results = asyncio.run(_burst(guarded.url, 10, chat("tell me a long story", **SLOW)))
    refused = [(r, s) for r, s in results if r.status_code == 503]
    admitted = [s for r, s in results if r.status_code != 503]
    assert len(refused) >= 6, Counter(r.status_code for r, _ in results)
    for response, seconds in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert "busy" in response.json()["error"]
        assert seconds < min(admitted)  # refused at once, not queued behind them
    assert {r.status_code for r, _ in results} <= {200, 503, 504}
    with authorized(guarded) as client:
        assert until_served(client).status_code == 200


def test_a_request_past_the_timeout_gets_504_and_the_service_goes_on(guarded):
    """Whatever the machine's speed: the work doubles until it outlasts the 0.5 s
    timeout (one slow reply already does on the machines seen so far)."""
    with authorized(guarded) as client:
        until_served(client)
        for replies in (1, 2, 4, 8, 16, 32, 64):
            work = {"requests": [chat("a long answer please", **SLOW)] * replies}
            start = time.perf_counter()
            response = client.post("/generate", json=work)
            if response.status_code != 200:
                break
        assert response.status_code == 504
        assert time.perf_counter() - start < 5
        assert "CHATBOT_TIMEOUT_S" in response.json()["error"]
        assert until_served(client).status_code == 200


# --- soak, disconnects, shutdown ----------------------------------------------------


@pytest.mark.soak
@pytest.mark.last  # the shared lane's servers have served every other test by then
def test_memory_stays_flat_under_long_varied_load(served: Served, chat_model: Served, request):
    """benchmarks/memory.py's traffic: varied lengths and histories,
    greedy, sampled and beam replies, whole and streamed, clients that leave mid-stream,
    invalid requests. After the warm-up, the whole server grows by at most 2%. Both
    families at once, each on its own server (a core each)."""
    requests = request.config.getoption("soak_requests")

    def run(served: Served) -> Soak:
        # 48 clients: a stream its client left holds one of the server's 64 places
        # until the server notices, and a 65th request would rightly be told to come back.
        return soak(served.url, served.process.pid, requests, requests // 2, 256, concurrency=48)

    families = {"blenderbot": served, "decoder-only": chat_model}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(families, pool.map(run, families.values()), strict=True))
    for family, done in runs.items():
        print(f"\nsoak, {family}: {done.seconds:.0f} s, {dict(done.outcomes)}, MiB "
              f"{[round(b / 2**20) for _, b in done.points]} ({done.growth:+.2%})")  # fmt: skip
    for done in runs.values():
        assert done.outcomes == done.expected
        assert done.growth <= 0.02


# --- idle connections -------------------------------------------------------------------
# httpx keeps an idle connection 5 s (POOL_EXPIRY_S), as uvicorn did before
# CHATBOT_KEEP_ALIVE_S: a request sent as the server closed its connection was lost.

POOL_EXPIRY_S = httpx.Limits().keepalive_expiry or 5.0  # the client's default pooling


def test_the_server_keeps_idle_connections_as_long_as_the_setting_says(monkeypatch):
    monkeypatch.setattr(uvicorn.Config, "__init__", uvicorn.Config.__init__)  # undone after
    keep_idle_connections(7.5)
    assert uvicorn.Config(app=None, timeout_keep_alive=5).timeout_keep_alive == 7.5


def test_pooled_connections_reused_at_the_keep_alive_boundary_never_fail(served: Served):
    """40 clients with httpx's default pool each reuse their connection 3 times after
    idling 4.90-5.09 s, across the pool's expiry (which closes it first, as the client
    side must), and one raw connection idles past uvicorn's former 5 s: 0 errors, and
    every connection idle under 5 s is reused, not reopened. Under 5 s by what the
    client measured, not by what it meant to sleep: on a busy machine a sleep ends
    late, and its connection rightly expires."""

    async def pooled_client(index: int) -> tuple[Counter[str], list[tuple[float, bool]]]:
        outcomes, reuses, port, done = Counter[str](), [], None, 0.0
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            for round_ in range(4):
                if round_:
                    await asyncio.sleep(POOL_EXPIRY_S - 0.1 + index % 20 * 0.01)
                idle = time.monotonic() - done
                try:
                    response = await client.get("/readyz")
                except httpx.HTTPError as error:
                    outcomes[type(error).__name__] += 1
                    continue
                finally:
                    done = time.monotonic()
                outcomes[str(response.status_code)] += 1
                stream = response.extensions["network_stream"]
                local_port = stream.get_extra_info("client_addr")[1]
                if round_:
                    reuses.append((idle, local_port == port))
                port = local_port
        return outcomes, reuses

    def raw_connection_idle_past_5_s() -> list[int]:
        connection = http.client.HTTPConnection("127.0.0.1", int(served.url.rsplit(":", 1)[1]))
        statuses = []
        for idle_s in (0, POOL_EXPIRY_S + 1):
            time.sleep(idle_s)
            connection.request("GET", "/readyz")
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            socket_used = connection.sock
        assert connection.sock is socket_used  # the same connection, never reopened
        connection.close()
        return statuses

    async def run() -> tuple[list[tuple[Counter[str], list[tuple[float, bool]]]], list[int]]:
        raw = asyncio.to_thread(raw_connection_idle_past_5_s)
        pooled = asyncio.gather(*(pooled_client(i) for i in range(40)))
        return await asyncio.gather(pooled, raw)

    pooled, raw = asyncio.run(run())
    assert sum((outcomes for outcomes, _ in pooled), Counter()) == {"200": 160}
    # httpx times a connection's idle from the response's end to the next request's
    # start, moments inside what is measured here: a margin for those moments.
    under = [
        reused for _, reuses in pooled for idle, reused in reuses if idle < POOL_EXPIRY_S - 0.05
    ]
    assert under, "no connection idled under 5 s: nothing was shown"
    assert all(under)
    assert raw == [200, 200]


def test_clients_that_leave_mid_request_break_neither_their_batch_nor_the_server(served: Served):
    payload = chat("a batch with deserters", num_beams=4, max_new_tokens=60)

    async def run() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as patient, \
                httpx.AsyncClient(base_url=served.url, timeout=0.05) as impatient:  # fmt: skip
            stay = [patient.post("/respond", json=payload) for _ in range(6)]
            leave = [impatient.post("/respond", json=payload) for _ in range(6)]
            return await asyncio.gather(
                asyncio.gather(*stay), asyncio.gather(*leave, return_exceptions=True)
            )

    stayed, left = asyncio.run(run())
    assert all(isinstance(r, httpx.TimeoutException) for r in left)
    assert [r.status_code for r in stayed] == [200] * 6
    assert len({r.json()["reply"] for r in stayed}) == 1  # same input, same reply
    after = LOCAL.post(f"{served.url}/respond", json=chat("anyone left?", **FAST), timeout=60)
    assert after.status_code == 200


def test_sigterm_lets_requests_in_flight_finish(served_to_stop: Served):
    async def run() -> list:
        async with httpx.AsyncClient(base_url=served_to_stop.url, timeout=60) as client:
            calls = [asyncio.create_task(client.post("/respond", json=chat("bye", **SLOW)))
                     for _ in range(8)]  # fmt: skip

            def all_received() -> bool:  # being answered, or answered already
                answering = in_progress(served_to_stop.url, "/respond")
                return answering + sum(c.done() for c in calls) >= len(calls)

            # Polled in a thread, so that the loop goes on sending meanwhile.
            await asyncio.to_thread(wait_for, all_received, "every request to reach the server")
            served_to_stop.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    assert [getattr(r, "status_code", r) for r in results] == [200] * 8
    assert served_to_stop.process.wait(timeout=60) is not None


def test_a_pipelined_request_does_not_ride_on_the_previous_ones_key(guarded):
    """uvicorn starts a pipelined request from inside the previous response's final
    send; it must still be checked (and logged) as a request of its own."""
    body = json.dumps(chat("hi", **FAST)).encode()

    def raw(request_id: str, key: str | None) -> bytes:
        head = (f"POST /respond HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n")  # fmt: skip
        head += f"Authorization: Bearer {key}\r\n" if key else ""
        return head.encode() + b"\r\n" + body

    with authorized(guarded) as client:
        until_served(client)
    with socket.create_connection(
        ("127.0.0.1", int(guarded.url.rsplit(":", 1)[1])), timeout=30
    ) as sock:
        sock.sendall(raw("piped-with-key", API_KEY) + raw("piped-without-key", None))
        received = b""
        while received.count(b"HTTP/1.1 ") < 2:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    assert logged(guarded, "piped-with-key")["status"] != 401  # 200, or 504 when slow
    assert logged(guarded, "piped-without-key")["status"] == 401
    assert b"HTTP/1.1 401" in received


# --- the chat page's side -------------------------------------------------------------


@contextmanager
def occupied(served: Served) -> Iterator[None]:
    """Take the single slot with one slow request (about 1 s) while the block runs."""

    def keep_busy() -> None:
        with authorized(served) as client:
            client.post("/respond", json=chat("keep busy", **SLOW))

    thread = threading.Thread(target=keep_busy)
    thread.start()
    wait_for(lambda: in_progress(served.url, "/respond") == 1, "the slot to be taken")
    try:
        yield
    finally:
        thread.join()


def test_the_page_client_sends_the_key_and_backs_off_while_busy(single_slot, monkeypatch):
    monkeypatch.setenv("CHATBOT_URL", single_slot.url)
    monkeypatch.setenv("CHATBOT_API_KEY", API_KEY)
    # Patient enough for the slow request to end however busy the machine is.
    monkeypatch.setenv("CHATBOT_CLIENT_RETRIES", "60")
    client = ChatClient.from_env()
    assert API_KEY not in repr(client)
    waits: list[float] = []
    with occupied(single_slot):
        reply = client.respond([{"role": "user", "content": "hi"}], on_busy=waits.append, **FAST)
    assert waits
    assert all(w >= 1 for w in waits)
    assert reply["completion_tokens"] >= 1
    with pytest.raises(ServiceError, match="401"):
        ChatClient(url=single_slot.url).info()


def test_the_page_tells_the_user_when_the_service_is_busy(single_slot, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATBOT_URL", single_slot.url)
    monkeypatch.setenv("CHATBOT_API_KEY", API_KEY)
    monkeypatch.setenv("CHATBOT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CHATBOT_CLIENT_RETRIES", "0")
    page = AppTest.from_file(APP, default_timeout=60).run()
    with occupied(single_slot):
        page = page.chat_input[0].set_value("are you there?").run()
    (error,) = page.error
    assert "busy" in error.value
    assert "Retry" in error.value
    assert [m.markdown[0].value for m in page.chat_message if m.markdown] == ["are you there?"]


def test_metrics_show_each_workers_resident_memory(server: str):
    """``chatbot_process_resident_memory_bytes``, by worker pid, as the process has it."""
    metrics = service_metrics(server)
    (pid, value), *others = re.findall(
        r'^chatbot_process_resident_memory_bytes\{pid="(\d+)"\} (\S+)$', metrics, re.MULTILINE
    )
    assert others == []  # one worker
    actual = psutil.Process(int(pid)).memory_info().rss
    assert 0.75 * actual <= float(value) <= 1.25 * actual  # updated every few seconds
