"""End to end in a real headless Chromium: the real page, the real service."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

from devtools.processes import free_port, stop_tree, wait_until_healthy

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
TIMEOUT_MS = 120_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian chromium is not installed (make browser)"
    ),
]


@pytest.fixture(scope="module")
def chat_page(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``streamlit run frontend/app.py`` on 127.0.0.1 against the test service."""
    port = free_port()
    env = {
        **os.environ,
        "CHATBOT_URL": server,
        "CHATBOT_DATA_DIR": str(tmp_path_factory.mktemp("chat-data")),
        "STREAMLIT_SERVER_ADDRESS": "127.0.0.1",
        "STREAMLIT_SERVER_PORT": str(port),
        "STREAMLIT_SERVER_HEADLESS": "true",
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "frontend/app.py"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/_stcore/health", process)
        yield url
    finally:
        stop_tree(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


REPLY_SHOWN = """() => {
    const bubbles = document.querySelectorAll('[data-testid="stChatMessage"]');
    return bubbles.length >= 2 && !bubbles[1].querySelector('[data-testid="stSpinner"]')
        && bubbles[1].querySelector('[data-testid="stMarkdownContainer"]') !== null;
}"""


def wait_for_reply(page) -> None:
    """Until the assistant's bubble shows text, not the thinking spinner."""
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
