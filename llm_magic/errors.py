"""The one exception tree of llm_magic.

Every error carries the HTTP status it maps to, a machine-readable ``type`` and a message that
says how to fix the problem. The library raises these; only the edges (``server.py``,
``magics.py``, ``cli.py``) turn them into HTTP responses or one-line user messages.
"""

from __future__ import annotations

import re
from typing import Any


class LLMMagicError(Exception):
    """Base class of every error llm_magic raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None  # OpenAI's string code; None: the one for the status (OPENAI_CODES)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        """The JSON error body every route answers with."""
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}

    def to_openai_dict(self) -> dict:
        """The error body of the OpenAI-compatible ``/v1`` routes, in OpenAI's shape: ``param``
        (the field at fault, where the message names one) and a string ``code``, which clients
        such as LangChain and LiteLLM read to tell a context overflow from other 400s."""
        return {"error": {"message": self.message, "type": self.type, "param": _param(self.message),
                          "code": self.code or _openai_code(self)}}


class InvalidRequest(LLMMagicError):
    """The request is malformed: the message names the field and what is wrong."""

    status = 400
    type = "invalid_request_error"


class AuthenticationError(LLMMagicError):
    """The token is missing or wrong."""

    status = 401
    type = "authentication_error"


class ModelNotAllowed(LLMMagicError):
    """The host refuses to load the requested model."""

    status = 403
    type = "permission_error"


class NotFound(LLMMagicError):
    """No such route, model repository or model file."""

    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    """The model spec names a repository or file that does not exist."""


class RequestTimeout(LLMMagicError):
    """The request's body did not arrive in time."""

    status = 408
    type = "invalid_request_error"


class PayloadTooLarge(LLMMagicError):
    status = 413
    type = "invalid_request_error"


class HostBusy(LLMMagicError):
    """Every generation slot and queue place is taken; try again after ``retry_after`` s."""

    status = 503
    type = "server_busy"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(LLMMagicError):
    """The request was withdrawn (its client left) before it ran."""

    status = 499
    type = "cancelled"


class TurnInterrupted(Cancelled):
    """Client side: a chat turn's reply was given up part way (``ChatSession``'s ``on_reply``
    said it did not finish); the conversation is as it was before the turn. ``text`` is what had
    arrived, ``answer`` the last reply (a ``client.Answer``), if any."""

    def __init__(self, text: str, answer: Any = None) -> None:
        super().__init__("the reply was interrupted: the turn is not added to the conversation")
        self.text, self.answer = text, answer


class ModelLoadError(LLMMagicError):
    """A model file exists but llama.cpp could not load it (the host's problem, not a bug)."""

    status = 502
    type = "model_load_error"


class NotSupported(LLMMagicError):
    """The host cannot do what was asked here (the engine it fronts lacks what it needs)."""

    status = 501
    type = "not_supported"


class EngineError(LLMMagicError):
    """The engine failed while it wrote an answer (a decode or sampler fault): the request ends
    with this error, the host carries on."""

    status = 500
    type = "engine_error"


class EngineUnavailable(LLMMagicError):
    """The engine a host fronts (vLLM, llama-server, any OpenAI-compatible URL) does not answer,
    or answers with a failure of its own; the message names it."""

    status = 502
    type = "engine_unavailable"
    code = "engine_unavailable"


class EngineTimeout(EngineUnavailable):
    """The engine a host fronts took longer than the host waits for it."""

    status = 504
    type = "engine_timeout"
    code = "engine_timeout"


class ModelDownloadError(LLMMagicError):
    """The hub could not be reached or the download failed."""

    status = 502
    type = "model_download_error"


class TunnelError(LLMMagicError):
    """cloudflared could not open a tunnel."""

    status = 502
    type = "tunnel_error"


class CellNotFound(LLMMagicError):
    """Notebook side: a ``{In[n]}``-style placeholder names a cell that has no such part."""

    status = 400
    type = "invalid_request_error"


class HostUnreachable(LLMMagicError):
    """Client side: nothing answers at the host URL."""

    status = 502
    type = "host_unreachable"


class HostError(LLMMagicError):
    """Host side: the server process could not be started or controlled."""

    status = 500
    type = "host_error"


class ServerError(LLMMagicError):
    """Client side: the host answered with an unexpected failure."""


# HTTP status -> error class, for the client to rebuild errors from JSON answers.
BY_STATUS: dict[int, type[LLMMagicError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    403: ModelNotAllowed,
    404: NotFound,
    408: RequestTimeout,
    413: PayloadTooLarge,
    503: HostBusy,
}


class UnsupportedMediaType(LLMMagicError):
    """A body sent as anything but JSON (a browser's form or text/plain post, say)."""

    status = 415
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The prompt (with room for the answer) does not fit in the model's context."""

    code = "context_length_exceeded"


BY_STATUS[415] = UnsupportedMediaType

# HTTP status -> OpenAI's string ``code`` for errors that have no more specific one.
OPENAI_CODES: dict[int, str] = {
    401: "invalid_api_key",
    403: "model_not_allowed",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    502: "model_load_error",
    503: "server_busy",
    504: "engine_timeout",
}

# Messages name the field at fault first, in quotes: 'messages[0].content' must be ...
_PARAM = re.compile(r"^(?:unknown field )?'([A-Za-z_][\w.\[\]-]{0,120})'")
# What the engine says when a prompt does not fit, until it raises ContextLengthExceeded itself.
_CONTEXT_OVERFLOW = re.compile(r"tokens but the (?:model's|embedding) context holds|longer than the embedding context")


def _param(message: str) -> str | None:
    match = _PARAM.match(message)
    return match.group(1) if match else None


def _openai_code(error: LLMMagicError) -> str | None:
    if isinstance(error, InvalidRequest) and _CONTEXT_OVERFLOW.search(error.message):
        return "context_length_exceeded"
    if isinstance(error, ModelNotFound):
        return "model_not_found"
    return OPENAI_CODES.get(error.status)

_KNOWN_REASONS = {
    "Connection refused": "connection refused",
    "Name or service not known": "unknown host name",
    "nodename nor servname": "unknown host name",
    "Temporary failure in name resolution": "unknown host name",
    "timed out": "timed out",
    "Connection reset": "connection reset",
    "Network is unreachable": "network unreachable",
    "No route to host": "no route to host",
    "RemoteDisconnected": "the host closed the connection",
    "CERTIFICATE_VERIFY_FAILED": "TLS certificate not trusted",
}


def connection_reason(exc: BaseException) -> str:
    """The gist of a requests/urllib3 error, whose own text nests several layers deep."""
    text = str(exc)
    for needle, reason in _KNOWN_REASONS.items():
        if needle in text:
            return reason
    return text if len(text) < 160 else text[:160] + "..."
