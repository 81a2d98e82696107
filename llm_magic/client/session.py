"""``ChatSession``: a conversation with a host, kept as OpenAI messages, whose turns run the
model's tool calls (Python functions, through ``ToolBox``) until the answer is text.

    >>> chat = Client(url, token).session("You are terse.", temperature=0)
    >>> chat.ask("What is the weather in Oslo?", tools=[weather]).text

An assistant turn keeps a thinking model's reasoning beside its content, as
``reasoning_content``. What a front end shows is left to hooks: ``on_reply`` reads each
reply's stream (by default silently), ``on_tool_call`` sees each call run, ``confirm`` may
refuse one, ``on_note`` hears why the model was told to answer in text. The notebook's
``%%llm`` passes its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from llm_magic.client import conversation
from llm_magic.client.python_tools import ToolBox
from llm_magic.errors import TurnInterrupted

if TYPE_CHECKING:
    from llm_magic.client.client import Answer, Client, Stream

__all__ = ["ChatSession", "TurnInterrupted", "consume"]

log = logging.getLogger(__name__)

DECLINED = "Error: the user declined to run this call."
Tools = Union[ToolBox, Sequence[Callable[..., Any]], dict[str, Callable[..., Any]], None]
OnReply = Callable[["Stream", bool], "tuple[str, bool]"]
OnToolCall = Callable[[str, str, str, bool], None]


def consume(stream: Stream, hidden: bool) -> tuple[str, bool]:
    """The default ``on_reply``: read the whole reply, showing nothing."""
    for _ in stream:
        pass
    return stream.text, True


class ChatSession:
    """A conversation with ``client``: ``ask`` sends the next user turn with the messages so
    far and keeps the answer. ``defaults`` are request fields sent with every turn
    (``temperature=``, ``max_tokens=``, ``model=``…); ``ask``'s own keywords override them.

    With ``tools``, a turn is as many requests as the model calls them: each call is run here
    and its result sent back, until the model answers in text. It must answer in text after
    ``max_tool_rounds`` rounds of calls, or once it repeats a call it has made in this turn."""

    def __init__(self, client: Client | None, system: str | None = None, *, max_tool_rounds: int = 5,
                 on_reply: OnReply | None = None, on_tool_call: OnToolCall | None = None,
                 confirm: Callable[[str], bool] | None = None, on_note: Callable[[str], None] | None = None,
                 limit_hint: str = "max_tool_rounds raises the limit", **defaults: Any) -> None:
        self.client = client  # may be set later (a notebook connects after its conversation began)
        self.system = system  # the system prompt a new conversation starts with
        self.defaults = defaults
        self.max_tool_rounds = max_tool_rounds
        self.on_reply, self.on_tool_call, self.confirm, self.on_note = on_reply, on_tool_call, confirm, on_note
        self.limit_hint = limit_hint  # said with the note that the round limit was reached
        self.messages: list[dict[str, Any]] = []
        self.last_answer: Answer | None = None
        self.reset()

    def __repr__(self) -> str:
        return f"<ChatSession {len(self.messages)} messages with {self.client!r}>"

    def reset(self) -> None:
        """A new conversation: only the session's system prompt is left."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, prompt: str | Sequence[dict[str, Any]], *, tools: Tools = None,
            tool_choice: str | dict[str, Any] = "auto", response_format: dict[str, Any] | None = None,
            max_tool_rounds: int | None = None, on_reply: OnReply | None = None,
            on_tool_call: OnToolCall | None = None, confirm: Callable[[str], bool] | None = None,
            on_note: Callable[[str], None] | None = None, **params: Any) -> Answer:
        """Send ``prompt`` (a string is one user message) as the next turn and return the final
        answer; the turn joins ``messages`` once it is complete. ``tool_choice`` applies to the
        first request of the turn (later ones: ``auto``). The hooks given here replace the
        session's for this turn. Raises ``TurnInterrupted`` when ``on_reply`` gives a reply up.

        With tools and a ``response_format``, a host constrains a reply to tool calls or to
        JSON, not both: while the model calls tools its text replies are read as hidden, and
        once it answers in text (or must answer), it is asked again for the data, with tools
        off and the format on."""
        client = self.client
        if client is None:
            raise ValueError("the session has no client to ask: set session.client")
        show = on_reply or self.on_reply or consume
        note = on_note or self.on_note or log.info
        limit = self.max_tool_rounds if max_tool_rounds is None else max_tool_rounds
        toolbox = tools if isinstance(tools, ToolBox) else ToolBox(tools) if tools else None  # ([]: no tools)
        params = {**self.defaults, **params}
        data_format = None
        if toolbox is None and response_format is not None:
            params["response_format"] = response_format
        elif toolbox is not None:
            data_format = response_format
        new = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        messages = [*self.messages, *new]
        rounds = 0
        results: dict[tuple[str, str], str] = {}  # the calls made in this turn, and what they gave
        must_answer = False
        while True:
            extra: dict[str, Any] = {}
            hidden = False
            if toolbox is not None:
                extra = {"tools": toolbox.specs,
                         "tool_choice": "none" if must_answer else (tool_choice if rounds == 0 else "auto")}
                if data_format is not None:
                    if must_answer:
                        extra["response_format"] = data_format
                    else:
                        hidden = True  # a text reply here is asked again, as data
            stream = client.chat_stream(messages, **params, **extra)
            text, finished = show(stream, hidden)
            answer = stream.answer
            if not finished or answer is None:
                raise TurnInterrupted(text, answer)
            if hidden and not answer.tool_calls:
                must_answer = True  # done with tools: now the answer, as data
                continue
            if not answer.tool_calls or must_answer or toolbox is None:  # a server that calls anyway is not followed
                messages.append(_assistant(answer, content=text))
                self.messages, self.last_answer = messages, answer
                return answer
            calls = [dict(call, id=call.get("id") or f"call_{rounds}_{i}") for i, call in enumerate(answer.tool_calls)]
            messages.append(_assistant(answer, content=text or None, tool_calls=calls))
            repeated = True
            for call in calls:
                key = (call["function"]["name"], _canonical(call["function"].get("arguments")))
                if key in results:  # the same call again: its result is known, and looping is likely
                    result = results[key]
                else:
                    repeated = False
                    result = results[key] = self._run(toolbox, call, confirm or self.confirm,
                                                      on_tool_call or self.on_tool_call)
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            rounds += 1
            if repeated:
                note("(the model repeated a call it had made: now it must answer in text)")
                must_answer = True
            elif rounds >= limit:
                note(f"(after {rounds} round{'s' * (rounds > 1)} of tool calls the model must answer in text; "
                     f"{self.limit_hint})")
                must_answer = True

    @staticmethod
    def _run(toolbox: ToolBox, call: dict[str, Any], confirm: Callable[[str], bool] | None,
             on_tool_call: OnToolCall | None) -> str:
        """One call the model made, run (unless ``confirm`` refuses it); its result's text."""
        name, arguments = call["function"]["name"], call["function"].get("arguments") or "{}"
        declined = confirm is not None and not confirm(f"{name}({arguments})")
        result = DECLINED if declined else toolbox.run(name, arguments)
        if on_tool_call is not None:
            on_tool_call(name, arguments, result, declined)
        return result

    # -- kept in a file ----------------------------------------------------------------------

    def save(self, path: str | Path, *, model: str | None = None, settings: dict[str, Any] | None = None) -> Path:
        """Write the conversation (``conversation.save``'s format) with the model of the last
        answer and the session's settings, unless others are given."""
        if model is None and self.last_answer is not None:
            model = self.last_answer.model or None
        if settings is None:
            settings = {"system": self.system, **self.defaults}
        return conversation.save(path, self.messages, model, settings)

    def load(self, path: str | Path) -> tuple[str | None, dict[str, Any]]:
        """Continue a saved conversation: its messages replace these, and its temperature and
        max_tokens become defaults. Returns the model it was held with and its settings."""
        messages, model, settings = conversation.load(path)
        self.messages = messages
        self.defaults.update({k: settings[k] for k in ("temperature", "max_tokens") if k in settings})
        return model, settings


def _assistant(answer: Answer, **fields: Any) -> dict[str, Any]:
    """An assistant turn as kept in ``messages``: its reasoning goes with it, as
    ``reasoning_content`` (the field an llm_magic host and llama-server read back)."""
    message = {"role": "assistant", **fields}
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    return message


def _canonical(arguments: str | None) -> str:
    """A call's arguments in one spelling, to recognise a repeated call."""
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True)
    except ValueError:
        return arguments or ""
