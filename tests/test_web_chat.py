"""The chat page at / in a real headless browser (Debian's chromium, driven by playwright; .ci/run installs both):
type a question, see the reasoning and the answer stream in, fold the thinking, stop an endless answer, switch
thinking off, keep a multi-turn history. A screenshot is saved for a person to look at.

The model is scripted (tests/test_engine.py's thinker): it thinks " hmm" until the budget closes the block, then
answers "Hello"; with thinking off it answers "Hello" at once."""
import os
import shutil

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from nanoqwen.checkpoint import save_model
from test_engine import scripted_model, thinker_script
from test_server import running

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.environ.get("NANOQWEN_SCREENSHOTS", os.path.join(os.path.dirname(__file__), "..", "runs", "out"))


@pytest.fixture(scope="module")
def page_url(tok, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("thinker"))
    save_model(scripted_model(thinker_script(tok)[0]), path)
    with running(path, max_batch=2, max_len=1024) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "the browser tests need Debian's chromium (apt-get install chromium; .ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _ask(page, text: str):
    page.fill("#input", text)
    page.keyboard.press("Enter")


def test_chat_page_streams_thinking_and_answer_then_stops_and_switches_thinking_off(page_url, browser):
    page = browser.new_page()
    page.goto(page_url + "/")
    expect(page.locator("#model")).to_have_text(os.path.basename(httpx.get(page_url + "/v1/models").json()["data"][0]
                                                                 ["id"]))
    # thinking on, a budget of 4: the reasoning shows apart, then folds away when the answer comes
    page.fill("#budget", "4")
    _ask(page, "hi")
    turn = page.locator(".assistant").nth(0)
    expect(turn.locator(".answer")).to_have_text("Hello", timeout=30_000)
    expect(turn.locator(".thinking-text")).to_contain_text("hmm hmm hmm hmm")
    expect(turn.locator("details.thinking")).not_to_have_attribute("open", "")
    expect(page.locator("#send")).to_be_enabled()

    # no budget: the model thinks forever until Stop, which ends the stream and frees the server's row
    page.fill("#budget", "")
    _ask(page, "again")
    second = page.locator(".assistant").nth(1)
    expect(second.locator(".thinking-text")).to_contain_text("hmm", timeout=30_000)
    expect(page.locator("#stop")).to_be_enabled()
    page.click("#stop")
    expect(second.locator(".note")).to_have_text("[stopped]")
    expect(page.locator("#stop")).to_be_disabled()
    for _ in range(100):
        if httpx.get(page_url + "/health").json()["running"] == 0:
            break
        page.wait_for_timeout(100)
    assert httpx.get(page_url + "/health").json()["running"] == 0

    # thinking off: the answer alone, no thinking block; the history holds all three turns
    page.uncheck("#thinking")
    expect(page.locator("#budget")).to_be_disabled()
    _ask(page, "no thinking please")
    third = page.locator(".assistant").nth(2)
    expect(third.locator(".answer")).to_have_text("Hello", timeout=30_000)
    expect(third.locator("details.thinking")).to_be_hidden()
    expect(page.locator(".user")).to_have_count(3)
    sent = page.evaluate("messages")
    assert [m["role"] for m in sent] == ["user", "assistant"] * 3
    assert sent[1]["reasoning_content"].startswith(" hmm") and sent[1]["content"] == "Hello"
    assert sent[5] == {"role": "assistant", "content": "Hello", "reasoning_content": ""}

    os.makedirs(SCREENSHOTS, exist_ok=True)
    shot = os.path.join(SCREENSHOTS, "web_chat.png")
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000
    page.close()
