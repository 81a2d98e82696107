"""A host without a token, on the user's own machine, and the web pages that user visits: a page
may send any host a "simple" request (a form, or a ``text/plain`` body) without the browser
asking the host first, so a host reads only bodies declared as JSON, which no page on another
origin can send without the host's CORS consent. Against real server processes; the browser
case in a real headless Chromium, as in test_chat_page."""

from __future__ import annotations

import json
import shutil
import subprocess
from http.server import BaseHTTPRequestHandler
from typing import Iterator

import pytest
import requests

from llm_magic import ApiHost, Client

from .local_http import serving

ASK_API = {"inputs": "Once upon a time,", "parameters": {"max_tokens": 5, "temperature": 0}}
ASK_CHAT = {"messages": [{"role": "user", "content": "Write a poem."}], "max_tokens": 5}


def served(host: ApiHost) -> int:
    return requests.get(f"{host.url}/health", timeout=10).json()["requests"]


@pytest.mark.parametrize("path, body", [("/api", ASK_API), ("/v1/chat/completions", ASK_CHAT)])
def test_a_text_plain_body_is_refused_with_415_and_nothing_runs(open_host: ApiHost, path: str, body: dict) -> None:
    before = served(open_host)
    r = requests.post(open_host.url + path, data=json.dumps(body), headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and r.headers["Content-Type"] == "application/json"
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    # a form post, as an HTML <form> on any page sends it
    assert requests.post(open_host.url + path, data={"x": json.dumps(body)}, timeout=30).status_code == 415
    assert served(open_host) == before
    assert f"POST {path} 415" in open_host.logs()


def test_every_client_still_gets_answers(open_host: ApiHost) -> None:
    url = open_host.url
    assert requests.post(url + "/api", json=ASK_API, timeout=60).json()["usage"]["completion_tokens"] == 5
    r = requests.post(url + "/api", data=json.dumps(ASK_API).encode(), timeout=60,
                      headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    assert Client(url).chat("Hi", max_tokens=2).usage["completion_tokens"] == 2
    from openai import OpenAI

    with OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        assert client.chat.completions.create(model="m", max_tokens=2, **{
            "messages": ASK_CHAT["messages"]}).usage.completion_tokens == 2
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is missing: scripts/test installs it")
    with_header = subprocess.run([curl, "-s", url + "/api", "-H", "Content-Type: application/json", "-d",
                                  json.dumps(ASK_API)], capture_output=True, text=True, timeout=60)
    assert json.loads(with_header.stdout)["answer"]["content"]
    # curl -d alone says application/x-www-form-urlencoded: the answer says what to add
    without = subprocess.run([curl, "-s", url + "/api", "-d", json.dumps(ASK_API)], capture_output=True, text=True,
                             timeout=60)
    assert "-H 'Content-Type: application/json'" in json.loads(without.stdout)["error"]["message"]


class _Page(BaseHTTPRequestHandler):
    """Another origin's page: it tries to drive the host with what a page may send unasked."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"<!doctype html><title>elsewhere</title><p>an unrelated site"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def elsewhere() -> Iterator[str]:
    with serving(_Page) as url:
        yield url + "/"


def test_a_page_on_another_origin_cannot_make_the_host_generate(open_host: ApiHost, elsewhere: str) -> None:
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    from .test_chat_page import CHROMIUM, CHROMIUM_ARGS

    before = served(open_host)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        page.goto(elsewhere)
        outcome = page.evaluate("""async ([host, api, chat]) => {
            const simple = {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}};
            await fetch(host + "/api", {...simple, body: JSON.stringify(api)});  // opaque: sent, unread
            await fetch(host + "/v1/chat/completions", {...simple, body: JSON.stringify(chat)});
            try {  // JSON needs the host's consent (a CORS preflight), which a host gives no page by default
                await fetch(host + "/api", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(api)});
                return "json read";
            } catch (e) { return "json refused"; }
        }""", [open_host.url, ASK_API, ASK_CHAT])
        browser.close()
    assert outcome == "json refused"
    assert served(open_host) == before  # nothing was generated
    logs = open_host.logs()
    assert "POST /api 415" in logs and "POST /v1/chat/completions 415" in logs
