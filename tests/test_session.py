"""``ChatSession``: a conversation whose turns run the model's tool calls. Its loop against a
scripted stand-in for ``/v1/chat/completions`` (each request gets the next scripted reply, as
OpenAI streams it), then once through the real host and the embedded model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from llm_magic.client import ChatSession, Client, ToolBox, TurnInterrupted
from llm_magic.client.session import DECLINED
from llm_magic.supervisor.host import ApiHost

from .local_http import serving


def text(content: str, finish: str = "stop") -> list[dict[str, Any]]:
    """A scripted text reply, in two deltas."""
    half = len(content) // 2
    return [{"model": "scripted", "choices": [{"index": 0, "delta": {"content": content[:half]}}]},
            {"model": "scripted", "choices": [{"index": 0, "delta": {"content": content[half:]},
                                               "finish_reason": finish}]}]


def calls(*made: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """A scripted reply of tool calls, each in two deltas (the name, then its arguments)."""
    chunks = []
    for i, (name, arguments) in enumerate(made):
        chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": i, "id": f"id{i}", "type": "function", "function": {"name": name, "arguments": ""}}]}}]})
        chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": i, "function": {"arguments": json.dumps(arguments)}}]}}]})
    chunks.append({"model": "scripted", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return chunks


class Script:
    """The replies to send, in order, and the request bodies received."""

    def __init__(self) -> None:
        self.replies: list[list[dict[str, Any]]] = []
        self.requests: list[dict[str, Any]] = []


@pytest.fixture
def scripted() -> Iterator[tuple[Script, Client]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 — http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.requests.append(body)
            assert self.path == "/v1/chat/completions" and body["stream"] is True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for chunk in script.replies.pop(0):
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as url:
        client = Client(url, retries=0)
        yield script, client
        client.close()


RAN: list[dict[str, Any]] = []


def add(a: int, b: int) -> int:
    """Add two numbers."""
    RAN.append({"a": a, "b": b})
    return a + b


@pytest.fixture(autouse=True)
def _clear_ran() -> None:
    RAN.clear()


def test_a_turn_runs_the_calls_and_ends_with_text(scripted) -> None:
    script, client = scripted
    script.replies = [calls(("add", {"a": 2, "b": 3})), text("It is 5.")]
    shown: list[tuple[str, str, str, bool]] = []
    session = client.session("Be brief.", temperature=0)
    answer = session.ask("What is 2 + 3?", tools=[add], tool_choice="required",
                         on_tool_call=lambda *call: shown.append(call), max_tokens=20)
    assert answer.text == "It is 5." and session.last_answer is answer
    assert RAN == [{"a": 2, "b": 3}] and shown == [("add", '{"a": 2, "b": 3}', "5", False)]
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = session.messages[2]["tool_calls"][0]
    assert call["id"] == "id0" and call["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert session.messages[3] == {"role": "tool", "tool_call_id": "id0", "content": "5"}
    first, second = script.requests
    assert first["tool_choice"] == "required" and second["tool_choice"] == "auto"  # required: the first round only
    assert first["tools"][0]["function"]["name"] == "add" and first["temperature"] == 0 and first["max_tokens"] == 20
    assert second["messages"] == session.messages[:4]  # the result went back with the conversation

    script.replies = [text("Yes.")]
    session.ask("Sure?")  # no tools: one request; the next turn carries the whole conversation
    assert script.requests[-1]["messages"][:5] == session.messages[:5] and "tools" not in script.requests[-1]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_a_repeated_call_is_not_run_again_and_the_model_must_answer(scripted) -> None:
    script, client = scripted
    script.replies = [calls(("add", {"a": 1, "b": 1})), calls(("add", {"b": 1, "a": 1})), text("2")]
    notes: list[str] = []
    answer = ChatSession(client).ask("1 + 1?", tools=ToolBox([add]), on_note=notes.append)
    assert answer.text == "2" and len(RAN) == 1  # the same call, spelled otherwise: its known result
    assert notes == ["(the model repeated a call it had made: now it must answer in text)"]
    assert [r["tool_choice"] for r in script.requests] == ["auto", "auto", "none"]


def test_after_max_tool_rounds_the_model_must_answer_in_text(scripted) -> None:
    script, client = scripted
    script.replies = [calls(("add", {"a": 1, "b": 1})), calls(("add", {"a": 2, "b": 2})), text("done")]
    notes: list[str] = []
    session = ChatSession(client, max_tool_rounds=2, on_note=notes.append)
    assert session.ask("Add.", tools=[add]).text == "done"
    assert len(RAN) == 2 and [r["tool_choice"] for r in script.requests] == ["auto", "auto", "none"]
    assert notes == ["(after 2 rounds of tool calls the model must answer in text; max_tool_rounds raises the limit)"]

    # a server that calls tools after it was told to answer is not followed
    script.replies = [calls(("add", {"a": 3, "b": 3})), calls(("add", {"a": 4, "b": 4}))]
    answer = session.ask("Again.", tools=[add], max_tool_rounds=1)
    assert len(RAN) == 3 and answer.tool_calls and session.messages[-1] == {"role": "assistant", "content": ""}


def test_json_with_tools_asks_for_the_data_once_the_tools_are_done(scripted) -> None:
    script, client = scripted
    script.replies = [calls(("add", {"a": 2, "b": 2})), text("The sum is 4."), text('{"sum": 4}')]
    hidden: list[bool] = []

    def on_reply(stream, quiet: bool) -> tuple[str, bool]:
        hidden.append(quiet)
        return "".join(stream), True

    data_format = {"type": "json_object"}
    session = ChatSession(client, on_reply=on_reply)
    answer = session.ask("Sum 2 and 2, as JSON.", tools=[add], response_format=data_format)
    assert answer.json() == {"sum": 4} and hidden == [True, True, False]
    first, second, third = script.requests
    assert "response_format" not in first and "response_format" not in second  # calls or JSON, not both
    assert third["response_format"] == data_format and third["tool_choice"] == "none"
    assert third["messages"] == session.messages[:3]  # the hidden text reply was not kept
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    assert session.messages[-1]["content"] == '{"sum": 4}'

    script.replies = [text("{}")]  # without tools, the format goes with the one request
    session.ask("Nothing.", response_format=data_format)
    assert script.requests[-1]["response_format"] == data_format


def test_a_declined_call_and_an_interrupted_reply(scripted) -> None:
    script, client = scripted
    script.replies = [calls(("add", {"a": 1, "b": 2})), text("I could not.")]
    asked: list[str] = []
    session = ChatSession(client, confirm=lambda call: asked.append(call) or False)
    session.ask("1 + 2?", tools=[add])
    assert asked == ['add({"a": 1, "b": 2})'] and RAN == [] and session.messages[2]["content"] == DECLINED

    before = list(session.messages)
    script.replies = [text("half of an answer")]

    def give_up(stream, hidden: bool) -> tuple[str, bool]:
        first = next(iter(stream))
        stream.close()
        return first, False

    with pytest.raises(TurnInterrupted) as stop:
        session.ask("More?", on_reply=give_up)
    assert stop.value.text == "half of " and session.messages == before  # the turn is not kept


def test_save_and_load_keep_the_conversation_and_its_settings(scripted, tmp_path: Path) -> None:
    script, client = scripted
    script.replies = [text("Hello Ada.")]
    session = client.session("Be brief.", temperature=0.2, max_tokens=9)
    session.ask("I am Ada.")
    path = session.save(tmp_path / "chat.json")
    data = json.loads(path.read_text())
    assert data["model"] == "scripted" and data["messages"] == session.messages
    assert data["settings"] == {"system": "Be brief.", "temperature": 0.2, "max_tokens": 9}

    other = client.session()
    model, settings = other.load(path)
    assert model == "scripted" and other.messages == session.messages
    assert other.defaults == {"temperature": 0.2, "max_tokens": 9}
    script.replies = [text("Ada.")]
    other.ask("Who am I?")
    assert script.requests[-1]["temperature"] == 0.2 and len(other.messages) == 5


def secret_number(name: str) -> int:
    """The secret number of a person.

    Args:
        name: the person's first name
    """
    RAN.append({"name": name})
    return 7391


def test_through_the_real_host_the_loop_runs_the_function_and_ends_in_text(host: ApiHost) -> None:
    with Client(host.url, host.token) as client:
        session = client.session(temperature=0, max_tokens=60)
        answer = session.ask("What is Ada's secret number?", tools=[secret_number], tool_choice="required")
    assert RAN and isinstance(RAN[0]["name"], str)  # the function ran, here, with the model's argument
    call = session.messages[1]["tool_calls"][0]
    assert call["function"]["name"] == "secret_number"
    assert session.messages[2] == {"role": "tool", "tool_call_id": call["id"], "content": "7391"}
    assert session.messages[-1] == {"role": "assistant", "content": answer.text} and not answer.tool_calls
    assert answer.model == host.model_name and answer.usage["prompt_tokens"] > 0
