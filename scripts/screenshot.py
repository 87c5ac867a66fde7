"""Screenshot of the chat page with a short conversation, for the README.

Starts ``scripts/run.sh`` (service + page, as ``make run`` does) on free ports with a
fresh conversation store, chats in headless Chromium, and saves a PNG.

    python scripts/screenshot.py docs/chat-page.png
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.processes import free_port, wait_until_healthy  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CONVERSATION = ["Hi! What is the capital of France?", "What is a famous landmark there?"]
START_TIMEOUT_S = 600


REPLY_SHOWN = """() => {
    const reply = document.querySelectorAll('[data-testid="stChatMessage"]')[INDEX];
    return reply !== undefined && !reply.querySelector('[data-testid="stSpinner"]')
        && !reply.querySelector('button')
        && reply.querySelector('[data-testid="stMarkdownContainer"]') !== null;
}"""


def chat(page: Page, text: str) -> None:
    """Send ``text`` and wait until its reply is whole (no spinner, no Stop button)."""
    reply = page.locator('[data-testid="stChatMessage"]').count() + 1
    box = page.locator('[data-testid="stChatInputTextArea"]')
    box.fill(text)
    box.press("Enter")
    page.wait_for_function(REPLY_SHOWN.replace("INDEX", str(reply)))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/chat-page.png")
    service_port, page_port = free_port(), free_port()
    env = {
        **os.environ,
        "PORT": str(service_port),
        "STREAMLIT_SERVER_PORT": str(page_port),
        "CHATBOT_DATA_DIR": tempfile.mkdtemp(prefix="chat-screenshot-"),
    }
    run = subprocess.Popen(
        [str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, start_new_session=True
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{service_port}/readyz", run, START_TIMEOUT_S)
        wait_until_healthy(f"http://127.0.0.1:{page_port}/_stcore/health", run, START_TIMEOUT_S)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(300_000)
            page.goto(f"http://127.0.0.1:{page_port}")
            for text in CONVERSATION:
                chat(page, text)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=60)
    print(out)


if __name__ == "__main__":
    main()
