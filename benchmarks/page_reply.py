"""How long a person waits on the chat page for a 128-token reply, after ``make run``.

Starts ``scripts/run.sh`` as ``make run`` does (offline here: SmolLM2-135M-Instruct on
its default precision), opens the page in headless Chromium, picks greedy decoding and
128 new tokens in the sidebar, and times each prompt in a cleared conversation from
the Enter key to the whole reply on the page: when its last words are shown (what a
reader waits for), and when the page has settled (the reply stored, the Stop button
gone). Then, in turns, the same request goes straight to the service through the
page's own client (``frontend.client``): the ratio is what the page, its store and the
browser add, on the same 2 cores. The service's ``generation_tokens`` counter says how
many tokens each reply had; a reply that ended before 128 tokens is reported but left
out of the medians.

    python benchmarks/page_reply.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import requests
from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.chat_page import chat, running_chat  # noqa: E402
from frontend.client import ChatClient  # noqa: E402

TOKENS = 128
PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a day in the life of a lighthouse keeper, hour by hour.",
    "Write a long letter to a friend about your trip to the mountains.",
]


def generated_tokens(service_url: str) -> float:
    """The service's count of tokens generated so far (``/metrics``)."""
    text = requests.get(f"{service_url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#") and "generation_tokens_total" in line
    )


def greedy_replies_of(page: Page, tokens: int) -> None:
    """Greedy decoding, and ``tokens`` in the "Max new tokens" slider (by its arrow
    keys, as a person without a mouse would set it)."""
    page.get_by_text("Greedy", exact=True).click()
    slider = page.locator('input[type=range][aria-label="Max new tokens"]')
    while (now := int(slider.input_value())) != tokens:
        slider.press("ArrowLeft" if now > tokens else "ArrowRight")
    page.wait_for_timeout(1000)  # the page's rerun with the new settings


LAST_REPLY = """() => {
    const messages = document.querySelectorAll('[data-testid="stChatMessage"]');
    const last = messages[messages.length - 1];
    const texts = last ? last.querySelectorAll('[data-testid="stMarkdownContainer"]') : [];
    const text = texts[texts.length - 1];  // while streaming, the Stop button's comes first
    return text ? text.innerText.replace(/\\s+/g, ' ').trim() : '';
}"""
WATCH = """() => {
    window.replyShown = [];
    const lastReply = LAST_REPLY;
    new MutationObserver(() => window.replyShown.push([performance.now(), lastReply()]))
        .observe(document.body, {subtree: true, childList: true, characterData: true});
    return performance.now();
}""".replace("LAST_REPLY", LAST_REPLY)
FIRST_SHOWN = "(text) => (window.replyShown.find(([, shown]) => shown === text) || [null])[0]"


def on_the_page(page: Page, prompt: str) -> float:
    """Chat ``prompt`` on the page; returns when its reply was whole on the screen, in
    seconds after the Enter key (and prints when the page settled)."""
    start = page.evaluate(WATCH)
    chat(page, prompt)
    settled = page.evaluate("performance.now()")
    shown = page.evaluate(FIRST_SHOWN, page.evaluate(LAST_REPLY)) or settled
    print(f"  page settled {(settled - start) / 1e3:.2f} s after the Enter key", flush=True)
    return (shown - start) / 1e3


def through_the_api(api: ChatClient, model: str, prompt: str) -> None:
    """The page's streamed request for ``prompt``, read to its end."""
    messages = [{"role": "user", "content": prompt}]
    for _ in api.stream(model, messages, max_new_tokens=TOKENS, num_beams=1, do_sample=False):
        pass


def timed(service_url: str, ask: Callable[[], float | None]) -> tuple[float, float]:
    """Seconds ``ask`` took (or the seconds it says), and the tokens the service
    generated meanwhile."""
    before = generated_tokens(service_url)
    start = time.perf_counter()
    said = ask()
    seconds = time.perf_counter() - start if said is None else said
    return seconds, generated_tokens(service_url) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=len(PROMPTS))
    args = parser.parse_args()
    whole: dict[str, list[float]] = {"page": [], "api": []}
    with running_chat() as running:
        page, api = running.page, ChatClient(running.service_url)
        model = api.info()["model"]
        greedy_replies_of(page, TOKENS)
        chat(page, "Hi!")  # the first request of a process warms it
        for prompt in (PROMPTS * args.rounds)[: args.rounds]:
            page.get_by_text("Clear conversation").click()
            page.wait_for_timeout(1000)
            asks = {"page": partial(on_the_page, page, prompt)}
            asks["api"] = partial(through_the_api, api, model, prompt)
            for way, ask in asks.items():
                seconds, tokens = timed(running.service_url, ask)
                print(f"{way}: {tokens:.0f} tokens in {seconds:.2f} s: {prompt}", flush=True)
                if tokens == TOKENS:
                    whole[way].append(seconds)
    if whole["page"] and whole["api"]:
        page_s, api_s = statistics.median(whole["page"]), statistics.median(whole["api"])
        print(f"a {TOKENS}-token reply whole on the chat page: median {page_s:.2f} s "
              f"({len(whole['page'])} replies; min {min(whole['page']):.2f}, "
              f"max {max(whole['page']):.2f}); straight to the service {api_s:.2f} s; "
              f"page / service: {page_s / api_s:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
