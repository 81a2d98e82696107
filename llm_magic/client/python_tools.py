"""The notebook's own Python functions as tools a model may call (``%%llm --tools f,g``).

A function is described to the model from its signature, type hints and docstring (Google
``Args:`` or Sphinx ``:param x:`` style); a call the model makes is run with its JSON
arguments converted back to the annotated types, and whatever it returns, or raises, becomes
the text the model reads next.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from llm_magic.errors import InvalidRequest

RESULT_CHARS = 20_000  # longer results are cut: the model's context is small
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The description (the text before any parameter section) and each parameter's text."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    section = None
    current = None
    for line in lines:
        stripped = line.strip()
        sphinx = re.match(r":param\s+(?:[^:]*\s)?(\w+):\s*(.*)", stripped)
        if sphinx:
            current, section = sphinx.group(1), "sphinx"
            params[current] = sphinx.group(2)
            continue
        if re.match(r"^(Args|Arguments|Parameters|Params):\s*$", stripped):
            section, current = "args", None
            continue
        if re.match(r"^(Returns?|Raises|Yields|Examples?|Notes?):\s*$", stripped) or stripped.startswith(":"):
            section, current = "other", None
            continue
        if section == "args":
            google = re.match(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if google and line.startswith((" ", "\t")) and not line.startswith(("        ", "\t\t")):
                current = google.group(1).lstrip("*")
                params[current] = google.group(2)
            elif current and stripped:
                params[current] += " " + stripped
            continue
        if section == "sphinx" and current and stripped and line.startswith((" ", "\t")):
            params[current] += " " + stripped
            continue
        if section is None:
            description.append(line)
    return "\n".join(description).strip(), {k: v.strip() for k, v in params.items()}


def schema_for(hint: Any) -> dict[str, Any]:
    """A JSON schema for a Python type hint; ``{}`` (anything) for what JSON cannot say."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        values = list(args)
        kinds = {_SIMPLE.get(type(v)) for v in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 and None not in kinds else {"enum": values}
    if origin in (typing.Union, types.UnionType):
        options = [schema_for(a) for a in args]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is typing.Annotated:
        return schema_for(args[0])
    if hint in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset, Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return {"type": "array", "prefixItems": [schema_for(a) for a in args], "minItems": len(args),
                    "maxItems": len(args)}
        return {"type": "array", "items": schema_for(args[0])} if args else {"type": "array"}
    if hint is dict or origin is dict:
        return {"type": "object", "additionalProperties": schema_for(args[1])} if len(args) == 2 \
            else {"type": "object"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [member.value for member in hint]}
    if isinstance(hint, type) and hasattr(hint, "model_json_schema"):  # a pydantic model
        return hint.model_json_schema()
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = _hints(hint)
        fields = dataclasses.fields(hint)
        return {"type": "object", "properties": {f.name: schema_for(hints.get(f.name, Any)) for f in fields},
                "required": [f.name for f in fields if f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING]}
    return {}


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # noqa: BLE001 — an unresolvable forward reference: describe what we can
        return {}


def _convert(value: Any, hint: Any) -> Any:
    """A JSON value back to the annotated type, where JSON loses it (models, dataclasses, enums,
    tuples); anything else as it came."""
    if hint is inspect.Parameter.empty or hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _convert(value, args[0])
    if origin in (typing.Union, types.UnionType):
        return value if value is None else _convert(value, next((a for a in args if a is not type(None)), Any))
    if isinstance(hint, type):
        if hasattr(hint, "model_validate") and isinstance(value, dict):
            return hint.model_validate(value)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            hints = _hints(hint)
            return hint(**{k: _convert(v, hints.get(k, Any)) for k, v in value.items()})
        if issubclass(hint, enum.Enum):
            return hint(value)
        if hint in (tuple, set, frozenset) and isinstance(value, list):
            return hint(value)
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    if origin in (tuple, set, frozenset) and isinstance(value, list):
        return origin(value)
    if origin is list and args and isinstance(value, list):
        return [_convert(v, args[0]) for v in value]
    return value


class Tool:
    """One function offered to the model."""

    def __init__(self, func: Callable[..., Any], name: str | None = None) -> None:
        if not callable(func):
            raise InvalidRequest(f"{name or func!r} is not a function")
        self.func = func
        self.name = name or getattr(func, "__name__", "")
        if not _NAME.match(self.name):
            raise InvalidRequest(f"{self.name!r} cannot be a tool name (letters, digits, _ and -, up to 64)")
        try:
            self.signature = inspect.signature(func)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{self.name}: its signature cannot be read, so it cannot be described") from None
        self.hints = _hints(func)

    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        description, param_docs = parse_docstring(inspect.getdoc(self.func))
        properties: dict[str, Any] = {}
        required = []
        for name, param in self.signature.parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            schema = dict(schema_for(self.hints.get(name, param.annotation)))
            if name in param_docs:
                schema["description"] = param_docs[name]
            if param.default is param.empty:
                required.append(name)
            elif (default := _as_json(param.default)) is not _NOT_JSON:
                schema["default"] = default
            properties[name] = schema
        function = {"name": self.name, "description": description or f"The Python function {self.name}.",
                    "parameters": {"type": "object", "properties": properties, "required": required}}
        return {"type": "function", "function": function}

    def call(self, arguments: dict[str, Any]) -> Any:
        """Run the function with the model's arguments (by name; positional-only ones in order)."""
        positional, keywords = [], {}
        params = self.signature.parameters
        unknown = [k for k in arguments if k not in params]
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"{self.name}() got unexpected argument(s): {', '.join(unknown)}; "
                            f"it takes: {', '.join(params)}")
        for name, value in arguments.items():
            param = params.get(name)
            value = _convert(value, self.hints.get(name, param.annotation if param else Any))
            if param is not None and param.kind is param.POSITIONAL_ONLY:
                positional.append((list(params).index(name), value))
            else:
                keywords[name] = value
        return self.func(*[v for _, v in sorted(positional)], **keywords)


_NOT_JSON = object()


def _as_json(value: Any) -> Any:
    """A default value as JSON has it (a tuple becomes a list, an enum its value), or _NOT_JSON."""
    try:
        return json.loads(json.dumps(value, default=_plain))
    except (TypeError, ValueError):
        return _NOT_JSON


def result_text(value: Any) -> str:
    """What the model reads of a return value: text as is, JSON for data, ``repr`` otherwise."""
    if isinstance(value, str):
        text = value
    elif hasattr(value, "model_dump_json"):
        text = value.model_dump_json()
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=_plain)
        except (TypeError, ValueError):
            text = repr(value)
    if len(text) > RESULT_CHARS:
        text = text[:RESULT_CHARS] + f"… (cut: {len(text)} characters in all)"
    return text


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError


class ToolBox:
    """The functions of one ``--tools`` cell, by name."""

    def __init__(self, functions: Sequence[Callable[..., Any]] | dict[str, Callable[..., Any]]) -> None:
        items = functions.items() if isinstance(functions, dict) else [(None, f) for f in functions]
        self.tools: dict[str, Tool] = {}
        for name, func in items:
            tool = Tool(func, name)
            self.tools[tool.name] = tool

    @property
    def specs(self) -> list[dict[str, Any]]:
        return [tool.spec() for tool in self.tools.values()]

    def run(self, name: str, arguments: str) -> str:
        """Run one call; a bad call or an exception the function raises becomes an ``Error: …``
        text for the model, which can then try again."""
        tool = self.tools.get(name)
        if tool is None:
            return f"Error: there is no tool named {name!r}; the tools are: {', '.join(self.tools)}"
        try:
            parsed = json.loads(arguments or "{}")
        except ValueError as exc:
            return f"Error: the arguments are not valid JSON ({exc})"
        if not isinstance(parsed, dict):
            return "Error: the arguments must be a JSON object of parameter names and values"
        try:
            return result_text(tool.call(parsed))
        except Exception as exc:  # noqa: BLE001 — whatever the user's function raises goes back to the model
            return f"Error: {type(exc).__name__}: {exc}"
