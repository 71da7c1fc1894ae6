"""The web page at / in a real browser (Debian's chromium through Playwright) against a real `blip2 serve`:
pick an image, caption, ask, chat with streamed answers, match; latencies shown; the API key flow; parts the
model cannot serve shown as unavailable; no request leaves 127.0.0.1; the server then shuts down cleanly.

BLIP2_BROWSER_MODEL=default runs the main test on that model (a real caption of an examples/ image) instead of
the tiny random one; BLIP2_SCREENSHOT=1 also writes the screenshot to docs/serve-page.png."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
import tiny_models as tm
from live import Server, save_full_model

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install playwright")

REPO = Path(__file__).resolve().parents[2]
KEY = "browser-test-key"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MS = re.compile(r"\d+ ms")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers started side by side: 'full' (LLM + matching heads, or $BLIP2_BROWSER_MODEL; API key on)
    and 'no_heads' (a transformers stage-2 checkpoint: caption/ask/chat but no matching)."""
    root = tmp_path_factory.mktemp("browser")
    full = os.environ.get("BLIP2_BROWSER_MODEL") or save_full_model(root / "full")
    tm.save_generation_model(root / "opt", "opt")
    with ThreadPoolExecutor(2) as pool:
        started = {"full": pool.submit(Server, full, "--api-key", KEY, timeout=300),
                   "no_heads": pool.submit(Server, root / "opt", timeout=300)}
        running = {name: f.result() for name, f in started.items()}
    yield running
    for srv in running.values():  # a test that failed early leaves its server running
        if srv.proc.poll() is None:
            srv.stop()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield b
        b.close()


@dataclass
class Seen:
    """What a page did: every request URL, every chat request body, every script error."""

    urls: list[str] = field(default_factory=list)
    chats: list[dict] = field(default_factory=list)
    chat_responses: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def request(self, r) -> None:
        self.urls.append(r.url)
        if r.url.endswith("/v1/chat/completions"):
            self.chats.append(r.post_data_json)

    def response(self, r) -> None:
        if r.url.endswith("/v1/chat/completions"):
            self.chat_responses.append(r)

    def assert_local_only(self, url: str) -> None:
        host = urlparse(url).hostname
        assert host == "127.0.0.1"
        foreign = [u for u in self.urls if urlparse(u).scheme != "data" and urlparse(u).hostname != host]
        assert not foreign, f"the page reached beyond {host}: {foreign}"
        assert not self.errors, self.errors


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = Seen()
    page.on("request", lambda r: seen.request(r))
    page.on("pageerror", lambda err: seen.errors.append(str(err)))
    page.on("response", lambda r: seen.response(r))
    page.goto(url)
    return page, seen


def stop_cleanly(srv: Server) -> None:
    assert srv.stop(timeout=30) == 0, "".join(srv.stderr[-30:])
    assert not any("Traceback" in line for line in srv.stderr), "".join(srv.stderr[-60:])


def test_page_captions_asks_chats_and_matches(servers, browser, tmp_path):
    expect = sync_api.expect
    expect.set_options(timeout=120_000)  # 2 shared cores: a 30-token beam caption can take seconds
    srv = servers["full"]
    health = json.load(urllib.request.urlopen(srv.url + "/health"))
    caps = health["capabilities"]
    if os.environ.get("BLIP2_BROWSER_MODEL"):
        image, other = REPO / "examples" / "easy-vqa-test-0.png", REPO / "examples" / "easy-vqa-test-1.png"
    else:
        image, other = tmp_path / "a.png", tmp_path / "b.png"
        for path, im in zip((image, other), tm.images(2, size=64)):
            im.save(path)

    page, seen = open_page(browser, srv.url)
    expect(page.locator("#status")).to_contain_text(health["model"])
    page.set_input_files("#file", str(image))
    expect(page.locator("#preview")).to_be_visible()

    # Without the key: a clear message, not a silent failure; with it, kept in this tab's sessionStorage only.
    page.click("#caption-btn")
    expect(page.locator("#caption-error")).to_contain_text("API key")
    page.fill("#api-key", KEY)
    assert page.evaluate("sessionStorage.getItem('blip2.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0

    assert caps["generate"], health
    page.click("#caption-btn")
    expect(page.locator("#caption-out")).to_have_text(re.compile(r"\S"))
    expect(page.locator("#caption-latency")).to_have_text(MS)
    expect(page.locator("#caption-error")).to_be_hidden()

    page.fill("#ask-questions", "what color is it ?\n\nwhat shape is this ?")
    page.click("#ask-btn")
    expect(page.locator("#ask-out dd")).to_have_count(2)
    expect(page.locator("#ask-out dt").nth(1)).to_have_text("what shape is this ?")
    expect(page.locator("#ask-latency")).to_have_text(re.compile(r"\d+ ms for 2 questions"))

    # Chat: record the answer's length at every DOM change, to see it grow token by token.
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const last = document.querySelector('#chat-log .msg.assistant:last-child .content');
            if (last) window.seen.push(last.textContent.length);
        }).observe(document.getElementById('chat-log'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-input", "what is in the picture ?")
    page.press("#chat-input", "Enter")  # keyboard: Enter sends
    answers = page.locator("#chat-log .msg.assistant")
    expect(answers.nth(0).locator(".latency")).to_have_text(re.compile(r"first token \d+ ms · total \d+ ms"))
    lengths = sorted(set(n for n in page.evaluate("window.seen") if n > 0))
    pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in
              seen.chat_responses[0].text().splitlines() if line.startswith("data: {")]
    pieces = [p for p in pieces if p]
    assert len(lengths) >= min(2, len(pieces)), f"{len(pieces)} pieces streamed, the page showed {lengths}"
    page.fill("#chat-input", "what color is it ?")
    page.click("#chat-send")
    expect(answers.nth(1).locator(".latency")).to_contain_text("total")
    expect(page.locator("#chat-log .msg")).to_have_count(4)
    for i in range(2):
        assert answers.nth(i).locator(".content").inner_text().strip()
    first, second = seen.chats
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"] and second["stream"]
    assert second["messages"][0] == first["messages"][0]  # the whole history each turn, image first
    assert second["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    expect(page.locator("#chat-latency")).to_have_text(re.compile(r"first token \d+ ms"))

    if caps["match"]:
        page.fill("#match-texts", "a red triangle\na blue circle\na dog")
        page.press("#match-texts", "Control+Enter")  # keyboard: Ctrl+Enter submits a multi-line box
        rows = page.locator("#match-out tbody tr")
        expect(rows).to_have_count(3)
        for i in range(3):
            prob = float(rows.nth(i).locator(".match").inner_text().strip().rstrip("%"))
            sim = float(rows.nth(i).locator(".similarity").inner_text())
            assert 0 <= prob <= 100 and -1 <= sim <= 1
        expect(page.locator("#match-latency")).to_have_text(re.compile(r"\d+ ms for 3 texts"))
    else:
        expect(page.locator("#match-card .unavailable")).to_be_visible()

    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nscreenshot: {shot}")
    if os.environ.get("BLIP2_SCREENSHOT"):
        shutil.copyfile(shot, REPO / "docs" / "serve-page.png")
        print(f"screenshot: {REPO / 'docs' / 'serve-page.png'}")

    # Reset starts a new conversation (image again in its first message); a new image resets it too.
    page.click("#chat-reset")
    expect(page.locator("#chat-log .msg")).to_have_count(0)
    page.fill("#chat-input", "what is it ?")
    page.click("#chat-send")
    expect(answers.nth(0).locator(".latency")).to_contain_text("total")
    assert len(seen.chats[-1]["messages"]) == 1
    page.set_input_files("#file", str(other))
    expect(page.locator("#chat-log .msg")).to_have_count(0)
    expect(page.locator("#caption-out")).to_have_text("")

    seen.assert_local_only(srv.url)
    stop_cleanly(srv)


def test_a_model_without_matching_heads_shows_match_as_unavailable(servers, browser, tmp_path):
    expect = sync_api.expect
    expect.set_options(timeout=120_000)
    srv = servers["no_heads"]
    page, seen = open_page(browser, srv.url)
    card = page.locator("#match-card")
    expect(card.locator(".unavailable")).to_contain_text("no image-text matching heads")
    expect(page.locator("#match-btn")).to_be_disabled()
    expect(page.locator("#match-texts")).to_be_disabled()
    expect(page.locator("#caption-card .unavailable")).to_be_hidden()

    tm.images(1)[0].save(tmp_path / "a.png")
    page.set_input_files("#file", str(tmp_path / "a.png"))
    page.click("#caption-btn")  # no API key on this server: none needed
    expect(page.locator("#caption-latency")).to_have_text(MS)
    expect(page.locator("#caption-error")).to_be_hidden()

    seen.assert_local_only(srv.url)
    stop_cleanly(srv)
