"""``make run`` on free ports with a fresh conversation store, and a headless Chromium
on its chat page: what ``scripts/screenshot.py`` and ``benchmarks/page_reply.py`` drive.
The tests launch the same Chromium with the same arguments.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from devtools.processes import free_port, wait_until_healthy, wait_while_compiling

if TYPE_CHECKING:  # Playwright is imported where a browser starts: the tests import this
    from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's (make browser); never a downloaded one
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
START_TIMEOUT_S = 600

REPLY_SHOWN = """() => {
    const reply = document.querySelectorAll('[data-testid="stChatMessage"]')[INDEX];
    return reply !== undefined && !reply.querySelector('[data-testid="stSpinner"]')
        && !reply.querySelector('button')
        && reply.querySelector('[data-testid="stMarkdownContainer"]') !== null;
}"""


@dataclass(frozen=True)
class RunningChat:
    service_url: str
    page: Page


def chat(page: Page, text: str) -> None:
    """Send ``text`` and wait until its reply is whole (no spinner, no Stop button)."""
    reply = page.locator('[data-testid="stChatMessage"]').count() + 1
    box = page.locator('[data-testid="stChatInputTextArea"]')
    box.fill(text)
    box.press("Enter")
    page.wait_for_function(REPLY_SHOWN.replace("INDEX", str(reply)))


@contextmanager
def running_chat() -> Iterator[RunningChat]:
    """``scripts/run.sh`` (service + page, as ``make run`` starts them) and a browser
    tab on its page, stopped on exit."""
    from playwright.sync_api import sync_playwright

    service_port, page_port = free_port(), free_port()
    env = {
        **os.environ,
        "PORT": str(service_port),
        "STREAMLIT_SERVER_PORT": str(page_port),
        "CHATBOT_DATA_DIR": tempfile.mkdtemp(prefix="chat-page-"),
    }
    run = subprocess.Popen(
        [str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, start_new_session=True
    )
    service_url = f"http://127.0.0.1:{service_port}"
    try:
        wait_until_healthy(f"{service_url}/readyz", run, START_TIMEOUT_S)
        wait_until_healthy(f"http://127.0.0.1:{page_port}/_stcore/health", run, START_TIMEOUT_S)
        wait_while_compiling(service_url)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(300_000)
            page.goto(f"http://127.0.0.1:{page_port}")
            yield RunningChat(service_url, page)
            browser.close()
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=60)
