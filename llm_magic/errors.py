"""The one exception tree of llm_magic.

Every error carries the HTTP status it maps to, a machine-readable ``type`` and a message that
says how to fix the problem. The library raises these; only the edges (``server.py``,
``magics.py``, ``cli.py``) turn them into HTTP responses or one-line user messages.
"""

from __future__ import annotations


class LLMMagicError(Exception):
    """Base class of every error llm_magic raises on purpose."""

    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        """The JSON error body every route answers with."""
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


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


class ModelLoadError(LLMMagicError):
    """A model file exists but llama.cpp could not load it (the host's problem, not a bug)."""

    status = 502
    type = "model_load_error"


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
