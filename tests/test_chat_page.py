"""The chat page at GET /, in a real headless Chromium (Debian's, driven by Playwright), against
the real server process and the embedded model.

Chromium comes from Debian's ``chromium`` package (``scripts/test`` installs it); these tests fail,
never skip, when it is missing, unless LLM_MAGIC_SKIP_BROWSER=1 says to skip them.
Set LLM_MAGIC_SCREENSHOT=PATH to save the README's screenshot of the page.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from llm_magic import ApiHost

from .test_tunnel import cloudflared  # noqa: F401  (a fixture)

TOKEN = "page-token-" + "x" * 20
CHROMIUM = os.environ.get("LLM_MAGIC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container, with no network but loopback: no sandbox, no background connections.
SCREENSHOT = os.environ.get("LLM_MAGIC_SCREENSHOT")  # read here: tests run without LLM_MAGIC_* variables
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]

if os.environ.get("LLM_MAGIC_SKIP_BROWSER") == "1":
    pytest.skip("LLM_MAGIC_SKIP_BROWSER=1", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/test (it installs Debian's chromium), "
                    "or set LLM_MAGIC_SKIP_BROWSER=1 to skip the browser tests")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page_host() -> Iterator[ApiHost]:
    h = ApiHost(port=0, token=TOKEN, tunnel="none").start()
    yield h
    h.stop()


@contextlib.contextmanager
def chat_page(browser, url: str) -> Iterator:
    """The chat page at ``url`` in a fresh browser context; no script error, ever."""
    # bypass_csp: Playwright's waits evaluate strings, which the page's policy forbids; it also
    # makes the sanitiser alone answer for what the XSS test checks (the policy has its own test)
    context = browser.new_context(viewport={"width": 1100, "height": 760}, color_scheme="light", bypass_csp=True)
    p = context.new_page()
    p.set_default_timeout(60_000)
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.goto(url + "/")
    yield p
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser, page_host: ApiHost) -> Iterator:
    with chat_page(browser, page_host.url) as p:
        yield p


def enter_token(page, token: str = TOKEN) -> None:
    page.wait_for_selector("#token-gate:not([hidden])")
    page.fill("#token-input", token)
    page.press("#token-input", "Enter")
    page.wait_for_selector("#token-gate", state="hidden")


def set_max_tokens(page, n: int, temperature: float | None = None) -> None:
    page.click("#open-settings")
    page.fill("#max-tokens", str(n))
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    page.click("#save-settings")


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def answers(page) -> list[str]:
    return page.eval_on_selector_all(".message.assistant .body", "els => els.map(e => e.textContent)")


def wait_until_done(page) -> None:
    page.wait_for_selector("#stop", state="hidden")
    page.wait_for_selector("#send:not([hidden])")


def test_the_page_is_the_only_html_and_runs_only_its_own_files(page_host: ApiHost) -> None:
    r = requests.get(page_host.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert TOKEN not in r.text  # public, and free of secrets
    policy = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    for asset, kind in (("app.js", "javascript"), ("app.css", "css"), ("vendor/marked.umd.js", "javascript"),
                        ("vendor/purify.min.js", "javascript"), ("vendor/highlight.min.js", "javascript")):
        r = requests.get(f"{page_host.url}/static/{asset}", timeout=30)
        assert r.status_code == 200 and kind in r.headers["Content-Type"], asset
    for path in ("/static/index.html", "/static/../server.py", "/static/vendor/LICENSE.marked", "/index.html"):
        r = requests.get(page_host.url + path, timeout=30)
        assert r.status_code == 404 and r.headers["Content-Type"] == "application/json", path


def test_the_icon_is_served_and_linked(page_host: ApiHost) -> None:
    r = requests.get(page_host.url + "/favicon.ico", timeout=30)  # what every browser asks for
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/x-icon"
    assert r.content[:4] == b"\x00\x00\x01\x00" and r.headers["X-Content-Type-Options"] == "nosniff"
    assert "max-age" in r.headers["Cache-Control"]
    page = requests.get(page_host.url + "/", timeout=30).text
    assert '<link rel="icon" href="favicon.ico" type="image/x-icon">' in page


def test_the_page_logs_no_error_with_its_policy_in_force(browser, page_host: ApiHost) -> None:
    """No console error in a whole exchange, and the icon the page links loads as an image under
    the page's own Content-Security-Policy (before, /favicon.ico was a 404: a console error in
    every browser)."""
    context = browser.new_context()  # no bypass_csp: what a user's browser enforces
    page = context.new_page()
    page.set_default_timeout(60_000)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(page_host.url + "/")
    enter_token(page)
    set_max_tokens(page, 6)
    send(page, "Say hello.")
    wait_until_done(page)
    assert answers(page)[-1]
    icon = page.evaluate("""async () => {
        const image = new Image();
        image.src = document.querySelector("link[rel~=icon]").href;
        await image.decode();  // fails if the policy blocks it or it is no image
        return [new URL(image.src).pathname, image.naturalWidth];
    }""")
    assert icon == ["/favicon.ico", 32]
    assert not problems, problems
    context.close()


def test_token_send_and_watch_the_answer_stream_in(page, page_host: ApiHost) -> None:
    enter_token(page)
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')")
    set_max_tokens(page, 60)
    send(page, "Write a short poem about the sea.")
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = page.evaluate("document.querySelector('.message.assistant:last-child .body')?.textContent || ''")
        if text:
            seen.add(text)
        if page.is_visible("#send"):
            break
        time.sleep(0.02)
    wait_until_done(page)
    final = answers(page)[-1]
    assert final and len(seen) > 2, seen  # it grew in several steps, not all at once
    assert "tokens/s" in page.text_content("#speed")
    assert page.text_content(".message.user .body") == "Write a short poem about the sea."


def test_stop_aborts_and_the_host_stops_generating(page, page_host: ApiHost) -> None:
    enter_token(page)
    set_max_tokens(page, 3000, temperature=0)  # greedy, this story runs past 600 tokens
    send(page, "Tell me a very long story about a dragon.")
    page.wait_for_function("(document.querySelector('.message.assistant .body')?.textContent || '').length > 20")
    left_before = page_host.logs(10_000).count("the client left")
    page.click("#stop")
    wait_until_done(page)
    assert "(stopped)" in page.text_content(".message.assistant .tools")
    # The host noticed, whether at its next look at the socket ("the client left; generation
    # stopped") or at its next write (the request's access line ends "(the client left)").
    deadline = time.monotonic() + 10
    while page_host.logs(10_000).count("the client left") == left_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page_host.logs(10_000).count("the client left") > left_before
    deadline = time.monotonic() + 3
    while requests.get(page_host.url + "/health", timeout=10).json()["slots_busy"]:
        assert time.monotonic() < deadline, "the stopped answer still holds its slot"
        time.sleep(0.05)


def test_a_wrong_token_is_a_clear_line_and_can_be_forgotten(page) -> None:
    enter_token(page, "not-the-token")
    send(page, "Hello?")
    line = page.wait_for_selector(".error-line")
    assert "refused the token" in line.text_content()
    page.click("#open-settings")
    page.click("#forget-token")
    page.click("#save-settings")
    page.wait_for_selector("#token-gate:not([hidden])")
    assert page.evaluate("localStorage.getItem('llm_magic.token')") in (None, "")


def test_a_request_the_host_refuses_shows_its_message(page) -> None:
    enter_token(page)
    send(page, "word " * 5000)  # more than the host's context holds
    line = page.wait_for_selector(".error-line")
    assert "Error 400" in line.text_content() and "context holds 4096" in line.text_content()


def test_conversations_are_kept_across_a_reload_and_regenerate_and_edit_work(page) -> None:
    enter_token(page)
    set_max_tokens(page, 8)
    send(page, "First conversation")
    wait_until_done(page)
    page.click("#new-chat")
    send(page, "Second conversation")
    wait_until_done(page)
    assert page.eval_on_selector_all("#conversations .title", "els => els.map(e => e.textContent)") == [
        "Second conversation", "First conversation"]
    page.click(".regenerate")
    wait_until_done(page)
    assert len(answers(page)) == 1  # the answer was replaced, not added
    page.click(".message.user .edit")
    assert page.input_value("#prompt") == "Second conversation" and not answers(page)
    page.reload()
    titles = page.eval_on_selector_all("#conversations .title", "els => els.map(e => e.textContent)")
    assert titles == ["Second conversation", "First conversation"]
    page.click("#conversations li:nth-child(2) .title")
    assert page.text_content(".message.user .body") == "First conversation" and len(answers(page)) == 1


def test_html_in_messages_and_answers_never_runs(page) -> None:
    enter_token(page)
    attack = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    # an answer as the model might write it, stored as the page stores answers, then shown
    page.evaluate("""attack => localStorage.setItem('llm_magic.conversations', JSON.stringify([{id: 'x', title: 't',
        messages: [{role: 'user', content: attack}, {role: 'assistant', content: 'Here:\\n\\n' + attack +
        '\\n\\n[link](javascript:window.__pwned=3)'}]}]))""", attack)
    page.evaluate("localStorage.setItem('llm_magic.current', 'x')")
    page.reload()
    page.wait_for_selector(".message.assistant")
    set_max_tokens(page, 4)
    send(page, attack)  # and typed, then sent to the host
    wait_until_done(page)
    time.sleep(0.5)  # an onerror would have fired by now
    assert page.evaluate("window.__pwned") is None
    assert page.text_content(".message.user .body") == attack  # shown as text
    assert page.evaluate("document.querySelectorAll('#messages script, #messages [onerror]').length") == 0
    assert page.evaluate("[...document.querySelectorAll('#messages a')].every(a => !a.href.startsWith('javascript'))")


def test_the_policy_stops_inline_script_even_past_the_sanitiser(browser, page_host: ApiHost) -> None:
    context = browser.new_context()  # the page's own Content-Security-Policy in force
    page = context.new_page()
    page.goto(page_host.url + "/")
    page.evaluate("""document.getElementById('messages').insertAdjacentHTML('beforeend',
        '<img src=x onerror="window.__pwned=1">')""")  # as if the sanitiser had let it through
    time.sleep(0.5)
    assert page.evaluate("window.__pwned") is None
    context.close()


def test_a_busy_host_and_a_host_gone_are_clear_lines(browser) -> None:
    host = ApiHost(port=0, token=TOKEN, tunnel="none", max_queue=0, extra_args=["--parallel", "1"]).start()
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    runner = requests.post(f"{host.url}/v1/completions", stream=True, timeout=60,
                           headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"prompt": "word " * 50, "max_tokens": 3000, "stream": True, "temperature": 0})
    lines = runner.iter_lines()  # kept: a dropped iterator closes the connection when collected
    try:
        next(lines)  # the one slot is taken
        page.goto(host.url + "/")
        enter_token(page)
        send(page, "Are you there?")
        line = page.wait_for_selector(".error-line")
        assert "busy" in line.text_content() and "retry in" in line.text_content()
    finally:
        runner.close()
        host.stop()
    send(page, "And now?")
    line = page.wait_for_selector(".error-line:has-text('Cannot reach the host')")
    assert "is it still running" in line.text_content()
    context.close()


def test_the_page_works_through_the_tunnel_on_a_phone(browser, cloudflared, tmp_path: Path) -> None:  # noqa: F811
    with ApiHost(port=0, token=TOKEN, tunnel="cloudflared") as host:
        assert host.public_url and host.public_url != host.url
        context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                      bypass_csp=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(host.public_url + "/")
        enter_token(page)
        assert not page.is_visible("#sidebar")  # out of the way on a phone until asked for
        set_max_tokens(page, 12)
        send(page, "Say hello.")
        wait_until_done(page)
        assert answers(page)[-1]
        page.click("#toggle-sidebar")
        page.wait_for_selector("#sidebar", state="visible")
        context.close()


def test_through_a_tunnel_that_buffers_streams_the_page_asks_for_whole_answers(browser, cloudflared) -> None:  # noqa: F811
    cloudflared.mode("buffer")
    with ApiHost(port=0, token=TOKEN, tunnel="cloudflared") as host:
        assert host.tunnel_streams is False
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        sent: list[dict] = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
        page.goto(host.public_url + "/")
        enter_token(page)
        page.wait_for_function("document.querySelector('#status').title.includes('delivers answers whole')")
        set_max_tokens(page, 12)
        send(page, "Say hello.")
        wait_until_done(page)
        assert answers(page)[-1] and sent[-1]["stream"] is False
        context.close()


def test_screenshot_for_the_readme(browser, page_host: ApiHost) -> None:
    """Saves the README's picture when LLM_MAGIC_SCREENSHOT names a path; the page renders code
    highlighted and answers as Markdown either way."""
    context = browser.new_context(viewport={"width": 1000, "height": 620}, color_scheme="light", bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(page_host.url + "/")
    enter_token(page)
    set_max_tokens(page, 250)
    send(page, "Write a Python function that reverses a string, with a short explanation.")
    wait_until_done(page)
    answer = page.inner_html(".message.assistant .body")
    assert "<p>" in answer or "<pre>" in answer  # rendered Markdown, not raw text
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT)
    context.close()
