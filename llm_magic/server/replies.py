"""Writing an answer: errors as JSON in the route's shape, a JSON answer that keeps a slow
line alive with leading whitespace, an SSE stream whose errors travel as events, and work run
beside the request's thread so that it can do both."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Iterator

from flask import Response, request

from llm_magic.errors import HostBusy, LLMMagicError
from llm_magic.server.inbound import ClientGone
from llm_magic.wire.events import Completion, Event, Signal
from llm_magic.wire.sse import sse

log = logging.getLogger("llm_magic.server")

CHECK_SECONDS = 0.1  # how often a waiting response checks whether its client left
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_shape() -> Callable[[LLMMagicError], dict]:
    """How this request's errors are written: OpenAI's shape on the OpenAI-compatible routes
    (under ``/v1``), the seed's elsewhere. Asked while the request is at hand, for bodies that
    are sent after it (streams)."""
    if request.path.startswith("/v1/"):
        return LLMMagicError.to_openai_dict
    return LLMMagicError.to_dict


def error_response(exc: LLMMagicError) -> Response:
    response = Response(json.dumps(error_shape()(exc)), status=exc.status, mimetype="application/json")
    if isinstance(exc, HostBusy):
        response.headers["Retry-After"] = str(exc.retry_after)
    if exc.status in (408, 413, 415):  # the rest of the body is not worth reading: end the connection
        response.headers["Connection"] = "close"
    return response


class Done:
    """The result of work done in the background (``in_background``)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def in_background(work: Callable[[threading.Event], Any], gone: Callable[[], bool]) -> Iterator[object]:
    """Run ``work(cancel)`` in a thread of its own: ``Signal.QUIET`` every ``CHECK_SECONDS`` while it
    runs, then its result as ``Done`` (or its error raised). A client that leaves sets
    ``cancel`` and ends the iterator; so does closing it."""
    cancel, box = threading.Event(), {}

    def run() -> None:
        try:
            box["value"] = work(cancel)
        except BaseException as exc:  # handed to the request's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="llm-magic-work", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(CHECK_SECONDS)
            if thread.is_alive():
                if gone():
                    log.info("the client left; its work stopped")
                    return
                yield Signal.QUIET
        if "error" in box:
            raise box["error"]
        yield Done(box["value"])
    finally:
        cancel.set()
        thread.join(10)  # it stops at its next check (an embedding group)


def json_response(events: Iterator[Any], render: Callable[[Any], dict], keepalive: float,
                   final: type = Completion) -> Response:
    """A non-streaming answer. One that is ready within ``keepalive`` seconds goes out as plain
    JSON (errors keep their status, the connection stays open for the next request). A longer
    one becomes a stream: a space every ``keepalive`` seconds keeps proxies from cutting the
    connection (leading whitespace is valid JSON) and notices a client that left, then the JSON.
    ``final``: the type of the event that is the answer (``render`` makes its JSON)."""
    shape = error_shape()
    deadline = time.monotonic() + keepalive
    try:
        for event in events:
            if isinstance(event, final):
                return Response(json.dumps(render(event), ensure_ascii=False), mimetype="application/json")
            if time.monotonic() >= deadline:
                break
        else:  # the events ended without an answer: the client left
            raise ClientGone()
    except BaseException:
        getattr(events, "close", lambda: None)()
        raise

    def body() -> Iterator[str]:
        last_sent = time.monotonic()
        try:
            yield " "
            for event in events:
                if isinstance(event, final):
                    yield json.dumps(render(event), ensure_ascii=False)
                elif time.monotonic() - last_sent >= keepalive:  # tokens flow, but nothing is sent
                    last_sent = time.monotonic()
                    yield " "
        except LLMMagicError as exc:
            yield json.dumps(shape(exc))
        except Exception as exc:
            log.exception("internal error while generating")
            yield json.dumps(shape(LLMMagicError(f"internal error ({type(exc).__name__}); see the host's log")))
        finally:
            close = getattr(events, "close", None)
            if close:
                close()

    return Response(body(), mimetype="application/json")


def sse_response(chunks: Iterator[str], events: Iterator[Event]) -> Response:
    """A streaming answer; ``events`` (what ``chunks`` renders) is closed with it, so that a
    client that leaves stops the generation."""
    shape = error_shape()

    def guarded() -> Iterator[str]:
        try:
            yield from chunks
        except LLMMagicError as exc:  # after the 200 went out, errors travel as an event
            yield sse(shape(exc))
        except Exception as exc:
            log.exception("internal error while streaming")
            yield sse(shape(LLMMagicError(f"internal error ({type(exc).__name__}); see the host's log")))
        finally:
            for iterator in (chunks, events):
                close = getattr(iterator, "close", None)
                if close:
                    close()

    return Response(guarded(), mimetype="text/event-stream", headers=SSE_HEADERS)
