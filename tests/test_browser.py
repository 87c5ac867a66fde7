"""End to end in a real headless Chromium: the real page, the real service."""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CHROMIUM, ROOT, running, wait_for

from devtools.processes import free_port

TIMEOUT_MS = 120_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian chromium is not installed (make browser)"
    ),
]


@contextmanager
def streamlit_page(
    server: str,
    data: Path,
    cwd: Path = ROOT,
    port: int | None = None,
    settings: dict[str, str] | None = None,
) -> Iterator[str]:
    """``streamlit run frontend/app.py`` on 127.0.0.1 against the test service, from
    ``cwd`` (where Streamlit looks for ``.streamlit/secrets.toml``), with ``settings``
    (environment variables) on top of the test's own."""
    port = port or free_port()
    env = {
        **os.environ,
        **(settings or {}),
        "CHATBOT_URL": server,
        "CHATBOT_DATA_DIR": str(data),
        "STREAMLIT_SERVER_ADDRESS": "127.0.0.1",
        "STREAMLIT_SERVER_PORT": str(port),
        "STREAMLIT_SERVER_HEADLESS": "true",
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "frontend" / "app.py")]
    with running(command, port, "/_stcore/health", cwd=cwd, env=env) as url:
        yield url


@pytest.fixture(scope="module")
def chat_page(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with streamlit_page(server, tmp_path_factory.mktemp("chat-data")) as url:
        yield url


def with_sign_in(cwd: Path, oidc_provider: str, port: int) -> Path:
    """``cwd`` with sign-in configured as the README says: ``[auth]`` in
    ``.streamlit/secrets.toml``, coming back to the page on ``port``."""
    (cwd / ".streamlit").mkdir()
    (cwd / ".streamlit" / "secrets.toml").write_text(
        "[auth]\n"
        f'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'
        'cookie_secret = "a-test-cookie-secret-4f1c9a"\n'
        'client_id = "chat-page"\nclient_secret = "chat-page-secret"\n'
        f'server_metadata_url = "{oidc_provider}/.well-known/openid-configuration"\n'
    )
    return cwd


@pytest.fixture(scope="module")
def sign_in_page(
    server: str, oidc_provider: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = free_port()
    cwd = with_sign_in(tmp_path_factory.mktemp("page-with-auth"), oidc_provider, port)
    with streamlit_page(server, tmp_path_factory.mktemp("chat-data"), cwd, port) as url:
        yield url


REPLY_SHOWN = """() => {
    const bubbles = document.querySelectorAll('[data-testid="stChatMessage"]');
    return bubbles.length >= 2 && !bubbles[1].querySelector('[data-testid="stSpinner"]')
        && !bubbles[1].querySelector('button')
        && bubbles[1].querySelector('[data-testid="stMarkdownContainer"]') !== null;
}"""


def wait_for_reply(page) -> None:
    """Until the assistant's bubble shows its whole reply: no thinking spinner, and no
    Stop button (which a streaming reply has)."""
    page.wait_for_function(REPLY_SHOWN)


def bubbles(page) -> list[str]:
    return page.locator('[data-testid="stChatMessage"]').all_inner_texts()


def test_chat_reload_and_download_in_a_real_browser(chat_page, browser, tmp_path):
    page = browser.new_page(accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(chat_page)

    box = page.locator('[data-testid="stChatInputTextArea"]')
    box.fill("Hello from Chromium! Ça va? 👋")
    box.press("Enter")
    wait_for_reply(page)
    thread = bubbles(page)
    assert "Hello from Chromium! Ça va? 👋" in thread[0]
    assert thread[1].strip()

    page.reload()
    wait_for_reply(page)
    assert bubbles(page) == thread

    with page.expect_download() as download:
        page.get_by_text("Download conversation (CSV)").click()
    saved = tmp_path / "conversation.csv"
    download.value.save_as(saved)
    rows = list(csv.DictReader(io.StringIO(saved.read_text(encoding="utf-8-sig"))))
    assert [(r["turn"], r["role"]) for r in rows] == [("1", "user"), ("2", "assistant")]
    assert rows[0]["text"] == "Hello from Chromium! Ça va? 👋"
    assert rows[1]["text"].strip()
    assert rows[1]["text"].split()[0] in thread[1]


def send(page, text: str) -> None:
    box = page.locator('[data-testid="stChatInputTextArea"]')
    box.fill(text)
    box.press("Enter")


def test_a_second_browser_sees_no_trace_of_the_first_ones_conversation(chat_page, browser):
    first = browser.new_context().new_page()
    first.set_default_timeout(TIMEOUT_MS)
    first.goto(chat_page)
    send(first, "My secret plans for Tuesday")
    wait_for_reply(first)
    link = first.url
    assert "?c=" in link

    second = browser.new_context().new_page()  # another browser: its own cookies
    second.set_default_timeout(TIMEOUT_MS)
    for url in (chat_page, link):
        second.goto(url)
        rendered(second)
        assert "secret plans" not in second.locator("body").inner_text()
        assert bubbles(second) == []

    first.reload()
    wait_for_reply(first)
    assert "My secret plans for Tuesday" in bubbles(first)[0]
    first.context.close()
    second.context.close()


def sign_in(page, page_url: str, user: str) -> None:
    page.goto(page_url)
    page.get_by_role("button", name="Sign in").click()
    page.locator('input[name="sub"]').fill(user)  # the provider's own login form
    page.get_by_role("button", name="Authorize").click()
    page.get_by_text(f"Signed in as {user}").wait_for()


def rendered(page) -> None:
    """Until the page's script has run to its end (the chat input comes last)."""
    page.locator('[data-testid="stChatInputTextArea"]').wait_for()
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
    )  # Streamlit's "Running..." indicator


def longest_replies(page) -> None:
    """Greedy decoding up to the most new tokens the service allows (SmolLM2: 1,024),
    so that a reply runs long enough to stop midway on any machine: at the default
    256, a busy machine's page took so long to react to Stop that the service had
    written the whole reply first."""
    page.get_by_text("Greedy").click()
    rendered(page)
    set_max_new_tokens(page, "End", "max")


def shortest_replies(page) -> None:
    """Replies of one token: what a test checks of them is where they go, not what they
    say, and the suite shares two cores."""
    set_max_new_tokens(page, "Home", "min")


def set_max_new_tokens(page, key: str, bound: str) -> None:
    slider = page.get_by_role("slider", name="Max new tokens")
    slider.press(key)
    wait_for(lambda: slider.get_attribute("aria-valuetext") == slider.get_attribute(bound), bound)
    rendered(page)


STOPPED = "Stopped: the reply ends here."
SETTLED_AS_STOPPED = f"""() => {{
    const bubbles = [...document.querySelectorAll('[data-testid="stChatMessage"]')];
    const stop = bubble => [...bubble.querySelectorAll("button")]
        .some(button => button.innerText.includes("Stop"));
    return bubbles.some(bubble => bubble.innerText.includes("{STOPPED}"))
        && !bubbles.some(stop);
}}"""  # the note shown, and no Stop button left in any bubble


def shown_stopped(page, timeout_ms: float | None = None) -> None:
    """Until a stopped reply is shown as such, alone: on a busy machine the page
    showed the note while the stale streaming text and its Stop button were still in
    the bubble below it, for a moment."""
    page.wait_for_function(SETTLED_AS_STOPPED, timeout=timeout_ms)
    rendered(page)


def sidebar_text(page) -> str:
    rendered(page)
    return page.locator('[data-testid="stSidebar"]').inner_text()


def test_signed_in_people_keep_their_own_conversations_in_any_browser(sign_in_page, browser):
    alice = browser.new_context().new_page()
    alice.set_default_timeout(TIMEOUT_MS)
    sign_in(alice, sign_in_page, "alice@example.com")
    send(alice, "Alice's surprise party plans")
    wait_for_reply(alice)

    bob = browser.new_context().new_page()
    bob.set_default_timeout(TIMEOUT_MS)
    sign_in(bob, sign_in_page, "bob@example.com")
    assert "surprise party" not in sidebar_text(bob)
    bob.goto(alice.url)  # Alice's conversation link
    assert "surprise party" not in sidebar_text(bob)
    assert bubbles(bob) == []

    elsewhere = browser.new_context().new_page()  # Alice on another browser
    elsewhere.set_default_timeout(TIMEOUT_MS)
    sign_in(elsewhere, sign_in_page, "alice@example.com")
    assert "surprise party" in sidebar_text(elsewhere)
    elsewhere.get_by_role("button", name="Sign out").click()
    elsewhere.get_by_role("button", name="End session").click()  # the provider asks
    elsewhere.get_by_role("button", name="Sign in").wait_for()
    assert "surprise party" not in sidebar_text(elsewhere)
    for page in (alice, bob, elsewhere):
        page.context.close()
