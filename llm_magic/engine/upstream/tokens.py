"""Counting a chat prompt's tokens with the engine's own chat template and tokenizer, for
Anthropic's ``count_tokens`` in front of an engine. OpenAI's API has no such route, so this
asks the engines that have one: vLLM's ``POST /tokenize`` takes the chat itself (and answers a
``count``); llama-server's renders the chat with ``POST /apply-template`` and tokenizes that
text with its ``/tokenize`` (which answers an empty list for a chat). Others: a clear 501.
"""

from __future__ import annotations

from typing import Any, Callable

from llm_magic.errors import NotSupported

# The parts of a chat body that make its prompt; sampling and streaming change nothing there.
PROMPT_FIELDS = ("model", "messages", "tools", "tool_choice", "chat_template_kwargs", "reasoning_effort")

Ask = Callable[[str, dict], Any]  # the engine's JSON answer at a path, None where it has no such route


def count_chat_tokens(ask: Ask, body: dict[str, Any], where: str) -> int:
    """The tokens of ``body``'s prompt (a ``/v1/chat/completions`` body) as the engine at
    ``where`` templates and tokenizes it."""
    chat = {name: body[name] for name in PROMPT_FIELDS if name in body}
    counted = ask("/tokenize", {**chat, "add_generation_prompt": True})
    if isinstance(counted, dict) and isinstance(counted.get("count"), int):  # vLLM
        return counted["count"]
    rendered = ask("/apply-template", chat)
    if isinstance(rendered, dict) and isinstance(rendered.get("prompt"), str):  # llama-server
        # add_special as llama-server tokenizes a chat's prompt (its template leaves out the BOS)
        tokens = ask("/tokenize", {"content": rendered["prompt"], "add_special": True})
        if isinstance(tokens, dict) and isinstance(tokens.get("tokens"), list):
            return len(tokens["tokens"])
    raise NotSupported(f"the engine at {where} cannot count a prompt's tokens: count_tokens needs an engine with "
                       "a /tokenize route (vLLM, llama-server)")
