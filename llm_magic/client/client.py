"""``Client``: talk to an llm_magic host, or to any OpenAI-compatible server, over HTTP.

It speaks the OpenAI ``/v1`` protocol (which every llm_magic host serves too), so the same
code works against vLLM, llama.cpp's llama-server, Ollama or ``llama_cpp.server``. Failures
become ``llm_magic.errors`` exceptions whose messages say what to do. Needs only ``requests``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, NamedTuple, Sequence, Union

import requests

from llm_magic.client.session import ChatSession
from llm_magic.errors import BY_STATUS, connection_reason, ContextLengthExceeded, HostBusy, HostUnreachable, LLMMagicError, ServerError

DEFAULT_URL = "http://127.0.0.1:5000"
# What tunnels and proxies answer while a host restarts or a connection blips: worth a retry.
TRANSIENT_STATUSES = {502, 504, 520, 521, 522, 523, 524, 525, 526, 527, 530}

Messages = Union[str, Sequence[dict]]


@dataclass
class Answer:
    """One finished generation."""

    text: str
    model: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's shape: id, type, function
    reasoning: str = ""  # a thinking model's reasoning, apart from ``text``; "" when none

    @property
    def reasoning_tokens(self) -> int:
        """Of ``usage["completion_tokens"]``, those the reasoning took (0 when not counted)."""
        details = self.usage.get("completion_tokens_details")
        return int(details.get("reasoning_tokens") or 0) if isinstance(details, dict) else 0

    def __str__(self) -> str:
        return self.text

    def json(self) -> Any:
        """The answer parsed as JSON (for ``response_format`` answers)."""
        return json.loads(self.text)


class Delta(NamedTuple):
    """One piece of a streamed answer: its visible ``text``, or its ``reasoning``."""

    kind: Literal["text", "reasoning"]
    text: str


def reasoning_of(message: dict) -> str:
    """A message's or a delta's reasoning: ``reasoning_content`` (llama-server's, DeepSeek's and
    an llm_magic host's name) or ``reasoning`` (vLLM's newer one)."""
    value = message.get("reasoning_content", message.get("reasoning"))
    return value if isinstance(value, str) else ""


class Stream:
    """An answer arriving piece by piece: iterate for the text deltas, or ``deltas()`` for the
    reasoning's pieces too; ``.answer`` once done."""

    def __init__(self, response: requests.Response, chat: bool) -> None:
        self._response = response
        self._chat = chat
        self._parts: list[str] = []
        self._thought: list[str] = []
        self._calls: dict[int, dict] = {}
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        return (delta.text for delta in self.deltas() if delta.kind == "text")

    def deltas(self) -> Iterator[Delta]:
        """The answer's pieces as they arrive, reasoning (``kind == "reasoning"``) apart from
        text (``"text"``). A stream is read once: by this or by iterating it."""
        model, finish, usage, timings = "", None, {}, {}
        try:
            for data in _sse_data(self._response):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # after the 200 went out, a failure comes as an event
                    raise _error_from_body(_status_of(chunk["error"]), chunk, self._response.url)
                model = chunk.get("model") or model
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    thought = reasoning_of(delta)
                    if thought:
                        self._thought.append(thought)
                        yield Delta("reasoning", thought)
                    text = delta.get("content") if self._chat else choice.get("text")
                    if text:
                        self._parts.append(text)
                        yield Delta("text", text)
                    for call in delta.get("tool_calls") or []:
                        self._add_tool_call(call)
                    finish = choice.get("finish_reason") or finish
        except requests.RequestException as exc:
            raise HostUnreachable(f"the connection to the host broke mid-answer ({connection_reason(exc)})") from None
        finally:
            self._response.close()
        calls = [self._calls[i] for i in sorted(self._calls)]
        self.answer = Answer(self.text, model, finish, usage, timings, calls, self.reasoning)

    def _add_tool_call(self, delta: dict) -> None:
        """Stream deltas carry a call in pieces, by index: the id and name first, then the
        arguments' text in fragments."""
        call = self._calls.setdefault(delta.get("index", len(self._calls)),
                                      {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = delta.get("id") or call["id"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    @property
    def reasoning(self) -> str:
        """The reasoning received so far ("" from a model that does not think)."""
        return "".join(self._thought)

    def close(self) -> None:
        """Stop receiving; the host stops generating."""
        self._response.close()


def _sse_data(response: requests.Response) -> Iterator[str]:
    for line in response.iter_lines(chunk_size=None, decode_unicode=False):
        if line.startswith(b"data:"):
            yield line[5:].strip().decode("utf-8")




# An error's ``type`` -> its HTTP status, for errors that arrive in the body of a 200 (after a
# keep-alive began the answer): OpenAI's shape on /v1 carries a string ``code``, not the status.
_TYPE_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                "not_found_error": 404, "server_busy": 503, "model_load_error": 502}


def _status_of(error: Any) -> int:
    """The HTTP status an error object in a body stands for: ``/api`` writes it as ``code``,
    ``/v1`` (OpenAI's shape) says it with ``type``."""
    if not isinstance(error, dict):
        return 500
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    return _TYPE_STATUS.get(str(error.get("type")), 500)


def _error_from_body(status: int, body: Any, url: str) -> LLMMagicError:
    message = None
    code = None
    if isinstance(body, dict):
        err = body.get("error", body.get("detail"))
        if isinstance(err, dict):
            message, code = err.get("message"), err.get("code")
        elif isinstance(err, str):
            message = err
    message = message or f"HTTP {status}"
    if code == "context_length_exceeded":  # OpenAI's code, and ours on /v1: a subclass of InvalidRequest
        return ContextLengthExceeded(message)
    cls = BY_STATUS.get(status)
    if status == 401:
        return cls(f"{message} — pass the host's token (token=..., --token or LLM_MAGIC_TOKEN)")  # type: ignore[misc]
    if cls is not None:
        return cls(message)
    return ServerError(f"{url} answered HTTP {status}: {message}")


class Client:
    """HTTP client for an llm_magic host or any OpenAI-compatible base URL.

    >>> client = Client("https://xyz.trycloudflare.com", token="...")
    >>> print(client.chat("Name three rivers."))
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 900.0,
        connect_timeout: float = 10.0,
        retries: int = 2,
    ) -> None:
        url = (url or os.environ.get("LLM_MAGIC_URL") or DEFAULT_URL).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.token = token if token is not None else os.environ.get("LLM_MAGIC_TOKEN") or None
        self.timeout = (connect_timeout, timeout)
        self.retries = retries
        self.http = requests.Session()  # (the HTTP connection pool; session() is a conversation)
        if self.token:
            self.http.headers["Authorization"] = f"Bearer {self.token}"

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- requests ----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, stream: bool = False,
                 timeout: Any = None) -> requests.Response:
        url = self.url + path
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, url, json=body, stream=stream,
                                             timeout=timeout or self.timeout)
            except requests.ConnectionError as exc:
                if attempt < self.retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise HostUnreachable(
                    f"cannot reach {self.url}: is the host running and the URL right? ({connection_reason(exc)})") from None
            except requests.Timeout:
                raise HostUnreachable(f"{self.url} did not answer within {self.timeout[1]:.0f} s") from None
            if response.status_code in TRANSIENT_STATUSES and attempt < self.retries:
                response.close()
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status_code >= 400:
                raise self._error(response)
            return response
        raise AssertionError("unreachable")

    def _error(self, response: requests.Response) -> LLMMagicError:
        try:
            body = response.json()
        except ValueError:
            body = None
        finally:
            response.close()
        if response.status_code in TRANSIENT_STATUSES and body is None:
            return HostUnreachable(
                f"{self.url} answered HTTP {response.status_code}: the host behind the tunnel is gone "
                "or restarting; check it, then retry")
        err = _error_from_body(response.status_code, body, self.url)
        if isinstance(err, HostBusy):
            err.retry_after = int(response.headers.get("Retry-After", err.retry_after) or err.retry_after)
        return err

    def _json(self, response: requests.Response) -> dict:
        """The JSON answer; an error that arrived after a keep-alive began (so with status 200)
        is raised like any other."""
        try:
            data = response.json()
        except ValueError:
            raise ServerError(f"{self.url} sent an answer that is not JSON") from None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            raise _error_from_body(_status_of(error), data, self.url)
        return data

    @staticmethod
    def _params(model: str | None, params: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in params.items() if v is not None}
        if model:
            body["model"] = model
        return body

    @staticmethod
    def _messages(messages: Messages, system: str | None) -> list[dict]:
        history = [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
        if system:
            history = [{"role": "system", "content": system}] + [m for m in history if m.get("role") != "system"]
        return history

    # -- public API ----------------------------------------------------------------------

    def chat(self, messages: Messages, *, model: str | None = None, system: str | None = None,
             **params: Any) -> Answer:
        """The assistant's answer to ``messages`` (a string is one user message). Any OpenAI
        field passes through ``params``: ``response_format=`` (then ``.json()`` parses the
        answer), ``tools=`` (then ``.tool_calls`` holds the calls), ``temperature=``, …"""
        body = {"messages": self._messages(messages, system), **self._params(model, params)}
        data = self._json(self._request("POST", "/v1/chat/completions", body))
        choice = data["choices"][0]
        message = choice["message"]
        return Answer(message.get("content") or "", data.get("model", ""), choice.get("finish_reason"),
                      data.get("usage") or {}, data.get("timings") or {}, message.get("tool_calls") or [],
                      reasoning_of(message))

    def complete(self, prompt: str, *, model: str | None = None, **params: Any) -> Answer:
        """A raw text completion of ``prompt``."""
        body = {"prompt": prompt, **self._params(model, params)}
        data = self._json(self._request("POST", "/v1/completions", body))
        choice = data["choices"][0]
        return Answer(choice.get("text") or "", data.get("model", ""), choice.get("finish_reason"),
                      data.get("usage") or {}, data.get("timings") or {})

    def chat_stream(self, messages: Messages, *, model: str | None = None, system: str | None = None,
                    **params: Any) -> Stream:
        """Like ``chat``, streaming: iterate the result for text deltas (``.deltas()`` also
        gives the reasoning's pieces)."""
        body = {"messages": self._messages(messages, system), "stream": True,
                "stream_options": {"include_usage": True}, **self._params(model, params)}
        return Stream(self._request("POST", "/v1/chat/completions", body, stream=True), chat=True)

    def complete_stream(self, prompt: str, *, model: str | None = None, **params: Any) -> Stream:
        """Like ``complete``, streaming: iterate the result for text deltas."""
        body = {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True},
                **self._params(model, params)}
        return Stream(self._request("POST", "/v1/completions", body, stream=True), chat=False)

    def session(self, system: str | None = None, **defaults: Any) -> ChatSession:
        """A conversation with this host: ``ask`` sends each turn with the ones before and runs
        the tool calls the model makes. ``defaults`` go with every turn (``temperature=``,
        ``max_tokens=``…), besides ``ChatSession``'s own keywords (``max_tool_rounds=``, hooks)."""
        return ChatSession(self, system, **defaults)

    def embed(self, texts: str | Sequence[str], *, model: str | None = None) -> Any:
        """Embeddings: one normalised vector (a list of floats) for a string, a list of vectors
        for a list of strings."""
        body = {"input": texts if isinstance(texts, str) else list(texts), **self._params(model, {})}
        data = self._json(self._request("POST", "/v1/embeddings", body))
        vectors = [item["embedding"] for item in sorted(data["data"], key=lambda item: item["index"])]
        return vectors[0] if isinstance(texts, str) else vectors

    def models(self) -> list[str]:
        """Ids of the models the server offers."""
        data = self._request("GET", "/v1/models", timeout=(self.timeout[0], 30)).json()
        return [m["id"] for m in data.get("data", [])]

    def health(self) -> dict[str, Any]:
        """The host's ``/health`` (status, model, queue); for other servers, their model list."""
        try:
            return self._request("GET", "/health", timeout=(self.timeout[0], 30)).json()
        except (LLMMagicError, ValueError) as exc:
            if isinstance(exc, HostUnreachable):
                raise
            return {"status": "ok", "models": self.models()}

    def slots(self) -> dict[str, Any]:
        """The host's ``/slots`` (with the token): each slot's state, its cache and the request
        it serves, the queue, and the host's tokens/s. Other servers have none: an error."""
        return self._json(self._request("GET", "/slots", timeout=(self.timeout[0], 30)))

    def metrics(self) -> str:
        """The host's ``/metrics`` (with the token), Prometheus' text format."""
        return self._request("GET", "/metrics", timeout=(self.timeout[0], 30)).text
