"""``make run`` on free ports with a fresh conversation store, and a headless Chromium
on its chat page: what ``scripts/screenshot.py`` and ``benchmarks/page_reply.py`` drive.
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

from playwright.sync_api import Page, sync_playwright

from devtools.processes import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
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


def chat(page: Page, text: str) -> str:
    """Send ``text``, wait until its reply is whole (no spinner, no Stop button), and
    return the reply's text."""
    messages = page.locator('[data-testid="stChatMessage"]')
    reply = messages.count() + 1
    box = page.locator('[data-testid="stChatInputTextArea"]')
    box.fill(text)
    box.press("Enter")
    page.wait_for_function(REPLY_SHOWN.replace("INDEX", str(reply)))
    return messages.nth(reply).inner_text()


@contextmanager
def running_chat(env: dict[str, str] | None = None) -> Iterator[RunningChat]:
    """``scripts/run.sh`` (service + page, as ``make run`` starts them) and a browser
    tab on its page, stopped on exit; ``env`` adds to the environment."""
    service_port, page_port = free_port(), free_port()
    env = {
        **os.environ,
        "PORT": str(service_port),
        "STREAMLIT_SERVER_PORT": str(page_port),
        "CHATBOT_DATA_DIR": tempfile.mkdtemp(prefix="chat-page-"),
        **(env or {}),
    }
    run = subprocess.Popen(
        [str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, start_new_session=True
    )
    service_url = f"http://127.0.0.1:{service_port}"
    try:
        wait_until_healthy(f"{service_url}/readyz", run, START_TIMEOUT_S)
        wait_until_healthy(f"http://127.0.0.1:{page_port}/_stcore/health", run, START_TIMEOUT_S)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(300_000)
            page.goto(f"http://127.0.0.1:{page_port}")
            yield RunningChat(service_url, page)
            browser.close()
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=60)
