"""A notebook conversation kept in a file (``%llm save`` / ``%llm load``), so that it outlives
the kernel: OpenAI chat messages as JSON, with the model and settings it was held with.

    {"format": "llm_magic.client.conversation", "version": 1, "model": "...", "settings": {...},
     "messages": [{"role": "user", "content": "..."}, ...]}

An assistant message may carry its reasoning as ``reasoning_content`` (a thinking model's).
A plain JSON list of messages loads too (what other tools save)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_magic.errors import InvalidRequest
from llm_magic.files import write_atomically

FORMAT = "llm_magic.client.conversation"
VERSION = 1
ROLES = ("system", "user", "assistant", "tool")


def save(path: str | Path, messages: list[dict[str, Any]], model: str | None, settings: dict[str, Any]) -> Path:
    """Write the conversation; the file is replaced whole or not at all."""
    path = Path(path).expanduser()
    data = {"format": FORMAT, "version": VERSION, "model": model,
            "settings": {k: v for k, v in settings.items() if v is not None}, "messages": messages}
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidRequest(f"cannot save to {path}: the folder {folder} does not exist")
    write_atomically(path, text)
    return path


def load(path: str | Path) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
    """Read a saved conversation: (messages, model, settings). ``InvalidRequest`` says what is
    wrong with a file that is not one."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequest(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise InvalidRequest(f"{path} is not JSON ({exc})") from None
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or "messages" not in data:
        raise InvalidRequest(f"{path} is not a saved conversation: expected an object with 'messages' "
                             "(or a list of messages)")
    if data.get("format", FORMAT) != FORMAT or data.get("version", VERSION) > VERSION:
        raise InvalidRequest(f"{path}: format {data.get('format')!r} version {data.get('version')!r} "
                             "is not one this llm_magic reads")
    messages = data["messages"]
    if not isinstance(messages, list):
        raise InvalidRequest(f"{path}: 'messages' must be a list")
    checked = [_message(m, i, path) for i, m in enumerate(messages)]
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise InvalidRequest(f"{path}: 'settings' must be an object")
    model = data.get("model")
    return checked, model if isinstance(model, str) else None, settings


def _message(message: Any, index: int, path: Path) -> dict[str, Any]:
    where = f"{path}: messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}")
    content = message.get("content")
    if not (content is None or isinstance(content, (str, list))):
        raise InvalidRequest(f"{where}.content must be text")
    if content is None and not message.get("tool_calls"):
        raise InvalidRequest(f"{where} has neither content nor tool_calls")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequest(f"{where}: a tool message needs its tool_call_id")
    reasoning = message.get("reasoning_content")
    if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
        raise InvalidRequest(f"{where}.reasoning_content must be text, on an assistant message")
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls):
            raise InvalidRequest(f"{where}.tool_calls must be a list of {{'function': {{'name': ...}}}} "
                                 "on an assistant message")
    return dict(message)
