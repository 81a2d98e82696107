"""The chat page with a thinking model, in a real headless Chromium against the real server and
the embedded model under a template that opens ``<think>`` (as test_reasoning_model): the
reasoning streams into a block of its own, open while it streams and folded once the answer
starts; the header's stats count its tokens; a setting hides it, and is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from llm_magic import ApiHost

from .test_chat_page import TOKEN, browser, chat_page, enter_token, send, set_max_tokens, wait_until_done  # noqa: F401
from .test_reasoning_model import BUDGET, TEMPLATE

# Every state the streaming reply's thinking block shows: (open, summary, the answer's text so far).
WATCH = """() => {
  window.seen = [];
  const look = () => {
    const reply = document.getElementById("messages").lastElementChild;  // the reply being written
    const block = reply?.classList.contains("assistant") ? reply.querySelector(".thinking") : null;
    if (block && !block.hidden)
      window.seen.push([block.open, block.querySelector("summary").textContent,
                        reply.querySelector(".body").textContent]);
  };
  new MutationObserver(look).observe(document.getElementById("messages"),
                                     { subtree: true, childList: true, characterData: true, attributes: true });
}"""


@pytest.fixture(scope="module")
def thinking_page_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHost]:
    template = Path(tmp_path_factory.mktemp("template")) / "thinking.jinja"
    template.write_text(TEMPLATE)
    host = ApiHost(port=0, token=TOKEN, tunnel="none", extra_args=[
        "--chat-template-file", str(template), "--reasoning-budget", str(BUDGET), "--parallel", "1"]).start()
    yield host
    host.stop()


@pytest.fixture
def page(browser, thinking_page_host: ApiHost) -> Iterator:  # noqa: F811
    with chat_page(browser, thinking_page_host.url) as p:
        yield p


def test_the_thinking_streams_in_its_own_block_and_folds_when_the_answer_starts(page) -> None:
    enter_token(page)
    set_max_tokens(page, 48, temperature=0)
    page.evaluate(WATCH)
    send(page, "Explain in detail why the sky is blue.")
    wait_until_done(page)

    block = page.locator(".message.assistant .thinking")
    assert block.is_visible() and block.evaluate("b => b.open") is False  # folded, there
    assert page.text_content(".message.assistant .thinking summary").startswith("Thought for ")
    reasoning = page.text_content(".message.assistant .thinking .reasoning")
    answer = page.text_content(".message.assistant .body")
    assert reasoning.strip() and answer.strip() and reasoning.strip() not in answer
    assert "think>" not in answer + reasoning

    seen = page.evaluate("window.seen")
    assert any(open_ and summary == "Thinking…" and not text for open_, summary, text in seen), seen  # streaming, open
    assert all(not open_ for open_, _, text in seen if text), seen  # folded before the answer's first text showed
    assert all(summary.startswith("Thought for") for _, summary, text in seen if text), seen

    stats = page.text_content("#speed")
    assert "tokens/s" in stats and " thinking)" in stats, stats  # e.g. "30.1 tokens/s · 48 tokens (8 thinking)"

    page.click(".message.assistant .thinking summary")  # the reader can open it
    assert block.evaluate("b => b.open") is True and page.is_visible(".message.assistant .thinking .reasoning")

    page.reload()  # the reasoning is kept with the conversation
    assert page.text_content(".message.assistant .thinking .reasoning") == reasoning
    assert page.text_content(".message.assistant .body") == answer


def test_a_setting_hides_the_thinking_and_is_kept(page) -> None:
    enter_token(page)
    set_max_tokens(page, 24, temperature=0)
    send(page, "Why is the sky blue?")
    wait_until_done(page)
    assert page.is_visible(".message.assistant .thinking")

    page.click("#open-settings")
    assert page.is_checked("#show-thinking")  # shown by default
    page.uncheck("#show-thinking")
    page.click("#save-settings")
    assert not page.is_visible(".message.assistant .thinking") and page.is_visible(".message.assistant .body")

    page.reload()
    page.wait_for_selector(".message.assistant .body")
    assert not page.is_visible(".message.assistant .thinking")
    page.click("#open-settings")
    assert not page.is_checked("#show-thinking")
    page.check("#show-thinking")
    page.click("#save-settings")
    assert page.is_visible(".message.assistant .thinking")
