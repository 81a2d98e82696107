"""Anthropic's Messages API on the host: ``POST /v1/messages`` and ``/v1/messages/count_tokens``
(Claude Code adds ``?beta=true``, which changes nothing), for Claude Code and the anthropic SDK.

A blueprint of its own, so that every failure on these routes is in Anthropic's shape
(``{"type": "error", "error": {"type", "message"}}``), before the answer and after it began
(an ``error`` event), and a busy host is Anthropic's 529, which the SDK retries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Iterator

from flask import Blueprint, Flask, Response, g
from werkzeug.exceptions import HTTPException

from llm_magic.engine.backend import Backend
from llm_magic.errors import HostBusy, LLMMagicError
from llm_magic.server.generation import start_generation
from llm_magic.server.httpserver import loggable
from llm_magic.server.inbound import ClientGone, authorize, json_body
from llm_magic.server.metrics import prompt_text
from llm_magic.server.replies import SSE_HEADERS, json_response
from llm_magic.wire.anthropic import (
    AnthropicRenderer, anthropic_error, anthropic_error_event, anthropic_status, estimate_tokens, parse_anthropic,
)
from llm_magic.wire.events import Completion, Event
from llm_magic.wire.types import GenerationRequest

log = logging.getLogger("llm_magic.server")


class _Failed:
    """An error met while a JSON answer was on its way: the answer it becomes."""

    def __init__(self, exc: LLMMagicError) -> None:
        self.exc = exc


def _catching(events: Iterator[Event]) -> Iterator[Any]:
    try:
        yield from events
    except LLMMagicError as exc:
        yield _Failed(exc)
    except Exception as exc:  # a bug: the log has it, the client a short word
        log.exception("internal error while generating")
        yield _Failed(LLMMagicError(f"internal error ({type(exc).__name__}); see the host's log"))
    finally:
        getattr(events, "close", lambda: None)()


def _error_response(exc: LLMMagicError) -> Response:
    response = Response(json.dumps(anthropic_error(exc)), status=anthropic_status(exc), mimetype="application/json")
    if isinstance(exc, HostBusy):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _stream(renderer: AnthropicRenderer, events: Iterator[Event]) -> Response:
    """The named events; an error after the 200 went out is an ``error`` event, as Anthropic's."""
    chunks = renderer.stream(events)

    def guarded() -> Iterator[str]:
        try:
            yield from chunks
        except LLMMagicError as exc:
            yield anthropic_error_event(exc)
        except Exception as exc:
            log.exception("internal error while streaming")
            yield anthropic_error_event(LLMMagicError(f"internal error ({type(exc).__name__}); see the host's log"))
        finally:
            for iterator in (chunks, events):
                getattr(iterator, "close", lambda: None)()

    return Response(guarded(), mimetype="text/event-stream", headers=SSE_HEADERS)


def register_anthropic(app: Flask, backend: Backend, *, token: str | None, max_body: int, keepalive: float,
                       log_prompts: bool = False) -> None:
    """Add the Messages API's routes and their error handlers to ``app``."""
    routes = Blueprint("anthropic", __name__)

    def parsed(counting: bool = False) -> GenerationRequest:
        body = json_body(max_body)
        authorize(token, body, body_token=False)
        gen_request = parse_anthropic(body, model_ids=(backend.default_name,), counting=counting)
        if log_prompts:
            g.track.prompt = prompt_text(gen_request)
        return dataclasses.replace(gen_request, request_id=g.track.id)

    @routes.post("/v1/messages")
    def messages() -> Any:
        gen_request = parsed()
        started, events = start_generation(backend, gen_request, keepalive, g.track)
        renderer = AnthropicRenderer(model=started.model if started else backend.default_name)
        if gen_request.stream:
            return _stream(renderer, events)
        state = {"answering": True}  # False once the 200 went out: errors then travel in the body

        def render(event: Any) -> dict:
            if isinstance(event, _Failed):
                if state["answering"]:
                    raise event.exc
                return anthropic_error(event.exc)
            return renderer.answer(event)

        response = json_response(_catching(events), render, keepalive, final=(Completion, _Failed))  # type: ignore[arg-type]
        state["answering"] = False
        return response

    @routes.post("/v1/messages/count_tokens")
    def count_tokens() -> Any:
        gen_request = parsed(counting=True)
        count = getattr(backend, "count_tokens", None)
        return {"input_tokens": count(gen_request) if count is not None else estimate_tokens(gen_request)}

    @routes.errorhandler(LLMMagicError)
    def handle_error(exc: LLMMagicError) -> Any:
        return _error_response(exc)

    @routes.errorhandler(ClientGone)
    def handle_gone(exc: ClientGone) -> Any:
        return Response(status=499)

    @routes.errorhandler(HTTPException)
    def handle_http(exc: HTTPException) -> Any:
        status = exc.code or 500
        message = f"the request body is larger than {max_body} bytes" if status == 413 else exc.description or exc.name
        err = LLMMagicError(loggable(message))
        err.status = status
        return _error_response(err)

    @routes.errorhandler(Exception)
    def handle_bug(exc: Exception) -> Any:
        log.exception("internal error on an Anthropic route")
        return _error_response(LLMMagicError(f"internal error ({type(exc).__name__}); see the host's log"))

    app.register_blueprint(routes)
