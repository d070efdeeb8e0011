"""The web playground in headless Chromium (Debian's `chromium`, driven by playwright): pick an adapter,
send a message, and see the reply arrive in several streamed pieces with TTFT and tok/s shown.

Skipped when playwright or a chromium binary is missing (playwright's own browser download cannot work here), except
under CI (`CI` set), where `.ci/run` installs Debian's chromium and a missing browser is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

httpx = pytest.importorskip("httpx")

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI must run the browser test: Debian's chromium is missing (.ci/run installs it: apt-get install chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")

# Count every change to the assistant's text: more than one means the reply was streamed in pieces.
COUNT_UPDATES = """() => {
  window.__updates = 0;
  new MutationObserver(() => { window.__updates += 1; })
    .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@contextlib.contextmanager
def playground(url: str) -> Iterator[tuple[object, list[str]]]:
    """The page at `url` in headless chromium, and the page errors it raises (a test asserts there are none)."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            yield page, errors
        finally:
            browser.close()


def test_playground_streams_a_reply_with_an_adapter(live, monkeypatch):
    import time

    sched = live.service.default.scheduler
    step = sched.step

    def slow_step() -> None:  # ~20 ms per token, so the tiny model's reply arrives in visibly separate pieces
        time.sleep(0.02)
        step()

    monkeypatch.setattr(sched, "step", slow_step)
    with playground(live.url) as (page, errors):
        page.wait_for_selector('#model option[value="tiny:polite"]', state="attached")
        page.select_option("#model", "tiny:polite")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        page.evaluate(COUNT_UPDATES)
        page.fill("#input", "hello there")
        page.click("#send")
        page.wait_for_selector(".msg.user")
        page.wait_for_function("document.getElementById('finish').textContent === 'length'", timeout=20000)
        reply = page.inner_text(".msg.assistant .body")
        updates = page.evaluate("window.__updates")
        ttft = page.inner_text("#ttft")
        toks = page.inner_text("#toks")
        ntok = page.inner_text("#ntok")
        assert not errors, errors
    want = httpx.post(
        live.api + "/chat/completions",
        json={"model": "tiny:polite", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 40, "temperature": 0},
        timeout=30,
    ).json()["choices"][0]["message"]["content"]
    assert reply == want and len(reply) > 10
    assert updates > 5  # streamed, not one final paint
    assert ttft.endswith(" ms") and float(toks) > 0
    assert ntok == "40"  # counted from the usage on each chunk, not from the chunks


def test_playground_asks_for_the_api_key_and_then_chats(tiny_dir):
    """A server started with --api-key: the page says it needs the key, and once it is typed in, models load and a
    message gets a reply."""
    from tests.serve.conftest import start_server, tiny_config

    srv = start_server(tiny_config(api_key="playground-key"), [str(tiny_dir)])
    try:
        with playground(srv.url) as (page, errors):
            page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
            page.fill("#api_key", "playground-key")
            page.dispatch_event("#api_key", "change")
            page.wait_for_selector('#model option[value="tiny"]', state="attached")
            page.fill("#max_tokens", "8")
            page.fill("#input", "hello")
            page.click("#send")
            page.wait_for_function("document.getElementById('finish').textContent === 'length'", timeout=20000)
            assert page.inner_text(".msg.assistant .body")
            assert not errors, errors
    finally:
        srv.stop()
