"""Screenshot of the chat page with a short conversation, for the README.

Starts ``scripts/run.sh`` (service + page, as ``make run`` does) on free ports with a
fresh conversation store, chats in headless Chromium, and saves a PNG.

    python scripts/screenshot.py docs/chat-page.png
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.chat_page import chat, running_chat  # noqa: E402

CONVERSATION = ["Hi! What is the capital of France?", "What is a famous landmark there?"]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/chat-page.png")
    with running_chat() as running:
        for text in CONVERSATION:
            chat(running.page, text)
        out.parent.mkdir(parents=True, exist_ok=True)
        running.page.screenshot(path=str(out))
    print(out)


if __name__ == "__main__":
    main()
