"""The ``%%llm`` cell: its body (with ``{name}``, ``{In[n]}``… filled in) is the next user turn
of the notebook's ``ChatSession``; ``--json``/``--schema`` make the answer data, ``--tools``
lets the model call the notebook's functions, ``--format code`` offers its code as a cell."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError

from llm_magic.client.client import Answer
from llm_magic.client.python_tools import ToolBox
from llm_magic.client.session import TurnInterrupted
from llm_magic.notebook.cells import interpolate
from llm_magic.notebook.rendering import answer_code

if TYPE_CHECKING:
    from llm_magic.notebook.magics import LLMMagics

Schema = tuple[dict[str, Any], Callable[[Any], Any]]  # a JSON schema, and what makes an object of an answer


class ChatCell:
    """Runs ``%%llm`` cells for ``magics``: its conversation, defaults and output."""

    def __init__(self, magics: LLMMagics) -> None:
        self.magics = magics

    @property
    def namespace(self) -> dict[str, Any]:
        shell = self.magics.shell
        return shell.user_ns if shell is not None else {}

    def run(self, args: argparse.Namespace, cell: str) -> None:
        m = self.magics
        if args.complete and (args.json or args.schema or args.tools or args.think is not None):
            raise UsageError("--complete is a raw completion: --json, --schema, --tools and --think/--no-think "
                             "need a chat turn")
        schema = self.schema(args.schema) if args.schema else None
        toolbox = self.toolbox(args.tools) if args.tools else None
        client = m.connected()
        prompt = self.interpolate(cell).strip()
        if not prompt:
            raise UsageError("the cell is empty: write your message below %%llm")
        if args.new:
            m.history.clear()
        system = args.system if args.system is not None else (m.system or None)
        if system is not None:
            m.history = [msg for msg in m.history if msg["role"] != "system"]
            m.history.insert(0, {"role": "system", "content": system})
        params = {"max_tokens": args.max_tokens or m.max_tokens,
                  "temperature": args.temperature if args.temperature is not None else m.temperature,
                  "top_p": args.top_p, "top_k": args.top_k, "stop": args.stop, "seed": args.seed,
                  "model": args.model}
        if not args.complete:
            params.update(think_fields(args.think if args.think is not None else m.think))
        as_json = args.json or schema is not None
        data_format = None
        if args.json:
            data_format = {"type": "json_object"}
        elif schema is not None:
            data_format = {"type": "json_schema",
                           "json_schema": {"name": args.schema, "schema": schema[0], "strict": True}}
        fmt = "json" if as_json else (args.format or m.format)
        live = m.stream and not args.no_stream
        if args.complete:
            stream = client.complete_stream(prompt, **params)
            text, finished = m.display.stream(stream, fmt, live)
            answer = stream.answer
        else:
            text, finished, answer = self.turn(prompt, params, fmt, live, toolbox, args.tool_choice, data_format)
        value: Any = text
        error = None
        if finished and as_json:
            try:
                value = self.parse_json(text, answer, schema, args.schema)
            except UsageError as exc:
                error = exc
        if m.shell is not None:
            m.shell.user_ns["_llm"] = value
            if args.output:
                m.shell.user_ns[args.output] = value
        if answer is not None:
            m.last_answer = answer
            m.display.footer(answer)
        if error is not None:
            raise error
        if finished and fmt == "code":
            m.display.offer_code(answer_code(text), "The answer's code")

    def turn(self, prompt: str, params: dict[str, Any], fmt: str, live: bool, toolbox: ToolBox | None = None,
             tool_choice: str = "auto", data_format: dict[str, Any] | None = None,
             ) -> tuple[str, bool, Answer | None]:
        """One turn of the notebook's conversation, shown as it streams, with the tool calls
        the model makes: the final text, whether it finished (then it is in the history), and
        the last answer."""
        m = self.magics
        session = m.session
        session.client = m.connected()
        try:
            answer = session.ask(
                prompt, tools=toolbox, tool_choice=tool_choice, response_format=data_format,
                max_tool_rounds=m.max_tool_rounds,
                on_reply=lambda stream, hidden: m.display.stream(stream, fmt, live, quiet=hidden),
                on_tool_call=m.display.tool_call, confirm=m.display.confirm if m.confirm_tools else None,
                on_note=print, **params)
        except TurnInterrupted as stop:
            return stop.text, False, stop.answer
        return answer.text, True, answer

    def interpolate(self, cell: str) -> str:
        shell = self.magics.shell
        if shell is None:
            return cell
        return interpolate(cell, shell.user_ns, shell, self.magics.cell_errors)

    def toolbox(self, names: str) -> ToolBox:
        """``--tools f,g``: the notebook's functions of those names."""
        namespace = self.namespace
        functions = {}
        for name in [n.strip() for n in names.split(",") if n.strip()]:
            if name not in namespace:
                raise UsageError(f"--tools {name}: no such function in the notebook")
            if not callable(namespace[name]):
                raise UsageError(f"--tools {name}: a {type(namespace[name]).__name__}, not a function")
            functions[name] = namespace[name]
        if not functions:
            raise UsageError("--tools: name the functions, separated by commas: --tools f,g")
        return ToolBox(functions)

    def schema(self, name: str) -> Schema:
        """The JSON schema named by ``--schema`` and a function that turns a parsed answer into
        the object kept in ``_llm`` (raising ``ValueError`` when it does not match)."""
        namespace = self.namespace
        if name not in namespace:
            raise UsageError(f"--schema {name}: no such name in the notebook "
                             "(a pydantic model class or a JSON-schema dict)")
        value = namespace[name]
        if isinstance(value, type) and hasattr(value, "model_json_schema"):
            return value.model_json_schema(), value.model_validate
        if isinstance(value, dict):
            return value, _json_schema_validator(name, value)
        raise UsageError(f"--schema {name}: expected a pydantic model class or a JSON-schema dict, "
                         f"not a {type(value).__name__}")

    @staticmethod
    def parse_json(text: str, answer: Answer | None, schema: Schema | None, name: str | None) -> Any:
        """The answer as data; a clear error if it is not (the text stays in ``_llm``)."""
        cut = answer is not None and answer.finish_reason == "length"
        try:
            data = json.loads(text)
        except ValueError as exc:
            hint = "it stopped at max tokens: raise --max-tokens" if cut else str(exc)
            raise UsageError(f"the answer is not valid JSON ({hint}); its text is in _llm") from None
        if schema is None:
            return data
        try:
            return schema[1](data)
        except ValueError as exc:
            first = str(exc).strip().splitlines()
            raise UsageError(f"the answer does not match {name} ({' '.join(first[:3])}); its text is in _llm") \
                from None


def think_fields(think: bool | None) -> dict[str, Any]:
    """The request fields of ``--think`` (True), ``--no-think`` (False) or neither (None: the
    model's default). Off is both the template's switch (Qwen3's and others' ``enable_thinking``)
    and a budget of 0, which closes the block of a template that opens it anyway."""
    if think is None:
        return {}
    if think:
        return {"chat_template_kwargs": {"enable_thinking": True}}
    return {"chat_template_kwargs": {"enable_thinking": False}, "thinking_budget_tokens": 0}


def _json_schema_validator(name: str, schema: dict[str, Any]) -> Callable[[Any], Any]:
    """Validation with ``jsonschema`` where it is installed (it is, wherever Jupyter is)."""
    try:
        import jsonschema
    except ImportError:
        print(f"(--schema {name}: answers are constrained on the host but not checked here: pip install jsonschema)")
        return lambda data: data
    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise UsageError(f"--schema {name} is not a valid JSON schema: {exc.message}") from None
    validator = validator_class(schema)

    def validate(data: Any) -> Any:
        error = jsonschema.exceptions.best_match(validator.iter_errors(data))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the top level"
            raise ValueError(f"at {where}: {error.message}")
        return data

    return validate
