"""The HTTP service — the only module that imports Flask (and its werkzeug).

``create_app(engine, token=...)`` builds the app: the seed's ``POST /api``, the OpenAI-compatible
``/v1`` routes and ``GET /health``. Every failure on every route is JSON, never HTML: in OpenAI's
shape on ``/v1`` (``param`` and a string ``code``), in the seed's (``code``: the status) elsewhere.
A body is read only when sent as ``application/json``: a browser sends anything else (a form,
``text/plain``) from any web page without asking the host first, so no page a user visits can
drive a host on their machine. The HTTP server under it is ``httpserver.HttpServer``.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from flask import Flask, Response, request, send_from_directory
from werkzeug.exceptions import HTTPException, NotFound

from llm_magic.version import __version__
from llm_magic.engine.llama_cpp.engine import QUIET, Engine
from llm_magic.errors import (
    AuthenticationError, HostBusy, InvalidRequest, LLMMagicError, ModelNotFound, PayloadTooLarge, RequestTimeout,
    UnsupportedMediaType,
)
from llm_magic.server.httpserver import MAX_BODY_BYTES, SOCKET_KEY, BodyTooLarge, loggable
from llm_magic.wire.openai import (
    DEFAULT_MODEL_ALIASES, OpenAIRenderer, embeddings_answer, parse_chat, parse_completion, parse_embeddings,
)
from llm_magic.wire.responses import ResponsesRenderer, parse_responses
from llm_magic.wire.protocol import (
    KEEPALIVE, ChoiceDelta, Completion, Event, GenerationRequest, Started, api_answer, api_stream,
    parse_api_request, sse,
)

log = logging.getLogger("llm_magic.server")

KEEPALIVE_SECONDS = 15.0  # well inside Cloudflare's 100 s idle limit
ROUTES = ("GET / (the chat page), POST /api, POST /v1/chat/completions, POST /v1/completions, "
          "POST /v1/responses, POST /v1/embeddings, GET /v1/models, GET /health, POST /health/stream")
WEB = Path(__file__).parent / "web"  # the chat page: static files, public, free of secrets
ICON_SECONDS = 86400  # browsers ask for /favicon.ico on every page; a day's cache spares them
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}  # all /static serves: never HTML
# The page runs only its own files: no inline script, nothing from elsewhere, so that text which
# got past the sanitiser still could not run, load, or send anything.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PROBE_EVENTS = 4  # POST /health/stream: events sent PROBE_INTERVAL s apart, and no model work
PROBE_INTERVAL = 0.25
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FINGERPRINT = f"llm_magic-{__version__}"  # OpenAI's system_fingerprint: which build answered


def create_app(
    engine: Engine,
    *,
    token: str | None = None,
    max_body: int = MAX_BODY_BYTES,
    keepalive: float = KEEPALIVE_SECONDS,
    extra_status: Callable[[], dict] | None = None,
    cors: Sequence[str] = (),
) -> Flask:
    """The llm_magic Flask app around ``engine``; ``token=None`` serves without a token.

    ``keepalive``: seconds of silence after which a busy response sends a keep-alive (an SSE
    comment, or leading whitespace before a JSON body). ``extra_status``: more for ``/health``.
    ``cors``: origins (or ``*``) whose browser pages may call the host; none by default.
    """
    app = Flask("llm_magic", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False  # Flask's own OPTIONS answer is empty HTML
    app.url_map.merge_slashes = False  # werkzeug would answer '//' with an HTML redirect
    app.extensions["llm_magic"] = {"engine": engine, "token": token, "started": int(time.time())}
    if cors:
        from flask_cors import CORS

        # The token travels in a header, never a cookie: no credentials mode is needed.
        CORS(app, origins=list(cors), allow_headers=["Authorization", "Content-Type"], max_age=600,
             expose_headers=["Retry-After"])

    @app.before_request
    def options() -> Any:
        if request.method != "OPTIONS":
            return None
        methods = app.url_map.bind_to_environ(request.environ).allowed_methods(request.path)
        if not methods:
            raise NotFound()
        allowed = sorted({*methods, "OPTIONS"} - {"HEAD"})
        return Response(json.dumps({"methods": allowed}), mimetype="application/json",
                        headers={"Allow": ", ".join(allowed)})

    @app.after_request
    def log_request(response: Response) -> Response:  # one line per request, never a body
        log.info("%s %s %s", request.method, loggable(request.path), response.status_code)
        return response

    @app.get("/")
    def chat_page() -> Any:
        return send_from_directory(WEB, "index.html", mimetype="text/html", max_age=0), PAGE_HEADERS

    @app.get("/favicon.ico")
    def favicon() -> Any:  # what every browser asks for; the page links it too
        response = send_from_directory(WEB, "favicon.ico", mimetype="image/x-icon", max_age=ICON_SECONDS)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/static/<path:name>")
    def static_file(name: str) -> Any:
        mimetype = STATIC_TYPES.get(Path(name).suffix)
        if mimetype is None:
            raise NotFound()
        response = send_from_directory(WEB, name, mimetype=mimetype, max_age=3600)  # NotFound outside WEB
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/health")
    def health() -> Any:
        status = engine.status()
        status.update(version=__version__, auth=token is not None)
        if extra_status is not None:
            status.update(extra_status())
        return status

    @app.post("/health/stream")
    def stream_probe() -> Any:
        """A few timed events, as a streamed answer is sent: whoever holds the token (the host,
        through its own tunnel) can check that a stream arrives as it is sent."""
        _authorize(token, None, body_token=False)

        def events() -> Iterator[str]:
            for i in range(PROBE_EVENTS):
                if i:
                    time.sleep(PROBE_INTERVAL)
                yield sse({"probe": i, "of": PROBE_EVENTS, "interval": PROBE_INTERVAL})
            yield sse("[DONE]")

        return Response(events(), mimetype="text/event-stream", headers=SSE_HEADERS)

    @app.post("/api")
    def api() -> Any:
        body = _json_body(max_body)
        _authorize(token, body)
        gen_request = parse_api_request(body)
        _, events = _start(engine, gen_request, keepalive)
        if gen_request.stream:
            return _sse_response(api_stream(events), events)
        return _json_response(events, api_answer, keepalive)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Any:
        return _openai(parse_chat, chat=True)

    @app.post("/v1/completions")
    def completions() -> Any:
        return _openai(parse_completion, chat=False)

    def _openai(parse: Callable[..., GenerationRequest], chat: bool) -> Any:
        return _generation(parse, lambda body, gen_request, model, tool_format: OpenAIRenderer(
            chat=chat, model=model, include_usage=gen_request.include_usage, fingerprint=FINGERPRINT,
            tools=gen_request.tools is not None, tool_format=tool_format, n=gen_request.n))

    @app.post("/v1/responses")
    def responses() -> Any:
        return _generation(parse_responses, lambda body, gen_request, model, tool_format: ResponsesRenderer(
            body, model=model, tool_format=tool_format))

    def _generation(parse: Callable[..., GenerationRequest], make_renderer: Callable[..., Any]) -> Any:
        """An OpenAI-style generation route: the token in the header, the body parsed by
        ``parse``, the answer rendered, whole or streamed, by ``make_renderer``'s renderer."""
        body = _json_body(max_body)
        _authorize(token, body, body_token=False)
        gen_request = parse(body, model_ids=(engine.default_name,))
        if len(gen_request.prompts) > 1:  # a list of prompts: one generation each, merged
            started, events = _Fanout.start(engine, gen_request, keepalive)
        else:
            started, events = _start(engine, gen_request, keepalive)
        renderer = make_renderer(body, gen_request, started.model if started else engine.default_name,
                                 started.tool_format if started else None)
        if gen_request.stream:
            return _sse_response(renderer.stream(events), events)
        return _json_response(events, renderer.answer, keepalive)

    @app.post("/v1/embeddings")
    def embeddings() -> Any:
        body = _json_body(max_body)
        _authorize(token, body, body_token=False)
        wanted = parse_embeddings(body, model_ids=(engine.default_name, *engine.embedding_names))
        if wanted.model is not None:
            raise InvalidRequest("'model': embeddings come from the host's own model (or its "
                                 "--embedding-model); leave 'model' out or send the listed id")
        dimensions = body.get("dimensions")

        def render(done: _Done) -> dict:
            result = done.value
            if dimensions is not None and result.vectors and dimensions != len(result.vectors[0]):
                raise InvalidRequest(f"'dimensions': this model's embeddings have {len(result.vectors[0])}")
            return embeddings_answer(result.vectors, result.model, result.prompt_tokens, wanted.base64)

        # computed beside the request's thread, so that the response can keep the line alive
        # and stop the work when the client leaves
        work = _in_background(lambda cancel: engine.embed(wanted.inputs, cancel), _client_gone_check())
        return _json_response(work, render, keepalive, final=_Done)

    def model_objects() -> dict[str, dict]:
        created = app.extensions["llm_magic"]["started"]
        names = dict.fromkeys([engine.default_name, engine.model or engine.default_name, *engine.embedding_names])
        return {name: {"id": name, "object": "model", "created": created, "owned_by": "llm_magic"} for name in names}

    def model_object(model_id: str) -> dict | None:
        """A listed model, or the default one under the name every route accepts for it."""
        objects = model_objects()
        return objects.get(engine.default_name) if model_id in DEFAULT_MODEL_ALIASES else objects.get(model_id)

    @app.get("/v1/models")
    def models() -> Any:
        _authorize(token, None, body_token=False)
        return {"object": "list", "data": list(model_objects().values())}

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str) -> Any:
        _authorize(token, None, body_token=False)
        found = model_object(model_id)
        if found is None:
            raise ModelNotFound(f"no model '{loggable(model_id, 200)}' here; GET /v1/models lists them")
        return found

    @app.errorhandler(LLMMagicError)
    def handle_error(exc: LLMMagicError) -> Any:
        return _error_response(exc)

    @app.errorhandler(_ClientGone)
    def handle_gone(exc: _ClientGone) -> Any:
        return Response(status=499)  # nginx's "client closed request": nobody reads it, the log does

    @app.errorhandler(HTTPException)
    def handle_http(exc: HTTPException) -> Any:
        messages = {
            404: f"no route {request.method} {request.path}; routes: {ROUTES}",
            405: f"{request.method} is not allowed on {request.path}; routes: {ROUTES}",
            413: f"the request body is larger than {max_body} bytes",
        }
        message = messages.get(exc.code or 500, exc.description or exc.name)
        err = LLMMagicError(loggable(message))
        err.status, err.type = exc.code or 500, "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
        if err.status == 404:
            err.code = "unknown_url"  # OpenAI's word for a route it does not have
        return _error_response(err)

    @app.errorhandler(Exception)
    def handle_bug(exc: Exception) -> Any:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error_response(LLMMagicError(f"internal error ({type(exc).__name__}); see the host's log"))

    return app


def _error_shape() -> Callable[[LLMMagicError], dict]:
    """How this request's errors are written: OpenAI's shape on the OpenAI-compatible routes
    (under ``/v1``), the seed's elsewhere. Asked while the request is at hand, for bodies that
    are sent after it (streams)."""
    if request.path.startswith("/v1/"):
        return LLMMagicError.to_openai_dict
    return LLMMagicError.to_dict


def _error_response(exc: LLMMagicError) -> Response:
    response = Response(json.dumps(_error_shape()(exc)), status=exc.status, mimetype="application/json")
    if isinstance(exc, HostBusy):
        response.headers["Retry-After"] = str(exc.retry_after)
    if exc.status in (408, 413, 415):  # the rest of the body is not worth reading: end the connection
        response.headers["Connection"] = "close"
    return response


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"the request body holds {name}, which is not valid JSON")


def _read_body(max_body: int) -> bytes:
    """The whole request body, refused past ``max_body`` bytes. Read from the server's own
    stream: werkzeug's wrapper would cut an oversized chunked body silently."""
    too_large = PayloadTooLarge(f"the request body is larger than {max_body} bytes")
    length = request.content_length
    if length is not None and length > max_body:
        raise too_large
    try:
        raw = request.environ["wsgi.input"].read(max_body + 1 if length is None else length)
    except BodyTooLarge:
        raise too_large from None
    except TimeoutError:  # our HTTP server's read deadline: a client sending too slowly
        raise RequestTimeout("the request body did not arrive in time; send it at once") from None
    except ValueError as exc:  # cheroot's word for a malformed chunked body
        raise InvalidRequest(f"the chunked request body is malformed: {loggable(str(exc), 100)}") from None
    except OSError as exc:
        if "Too Large" in str(exc):  # cheroot says "Request Entity Too Large" as an IOError too
            raise too_large from None
        raise _ClientGone() from None
    if len(raw) > max_body:
        raise too_large
    return raw


def _json_body(max_body: int) -> Any:
    # Before anything is read: a body that is not declared JSON is what a web page can send to
    # any host without the browser asking it first (no CORS preflight), a form or text/plain.
    if request.mimetype != "application/json":
        sent = request.mimetype or "no Content-Type"
        raise UnsupportedMediaType(
            f"send the body as JSON with the header 'Content-Type: application/json' (this request "
            f"sent {loggable(sent, 100)}); with curl: -H 'Content-Type: application/json', with requests: json=")
    raw = _read_body(max_body)
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8 text") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({str(exc)[:200]})") from None
    if "\\u" in text and _has_lone_surrogate(body):  # only a \u escape can make one
        raise InvalidRequest("the request body holds a lone UTF-16 surrogate (such as \\ud800), "
                             "which is not text; send valid Unicode")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in a parsed JSON value holds an unpaired surrogate (JSON lets a
    ``\\ud800`` escape write one; it is not text, and encoding it later fails)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not _encodable(item):
            return True
    return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _authorize(token: str | None, body: Any, body_token: bool = True) -> None:
    """Check the token from the JSON body (seed style) or the ``Authorization: Bearer`` header."""
    supplied = None
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        supplied = header[7:].strip()
    elif body_token and isinstance(body, dict) and "token" in body:
        supplied = body["token"]
    if token is None:
        return
    if supplied is None or supplied == "":
        where = "as 'token' in the JSON body or " if body_token else ""
        raise AuthenticationError(
            f"this host needs its access token: send it {where}as the header "
            "'Authorization: Bearer <token>' (the api_key of OpenAI clients)")
    if not isinstance(supplied, str) or not hmac.compare_digest(supplied.encode(), token.encode()):
        raise AuthenticationError("wrong token: copy it again from the host's output")


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()
_QUIET = object()  # no event within the wait
CHECK_SECONDS = 0.1  # how often a waiting response checks whether its client left
# The most a withdrawn generation is waited for, in case llama.cpp never ends its step; a step
# ends within a second or so even on a busy machine.
WITHDRAW_SECONDS = 30.0


class _Pump:
    """One generation, read so that the response can send keep-alives while llama.cpp is busy
    (waiting in the queue, loading, evaluating a long prompt) and notice a client that left. Up
    to ``Started`` (waiting in line, loading) the generation runs in a thread of its own; then
    the response's thread reads it directly, the engine saying ``QUIET`` at each check interval.
    Closing it withdraws the generation, which frees its slot within a token.

    It tells the engine when the first text has gone out: a generation running alone pauses
    until then, since the next token's decode keeps every core busy and on a small machine
    would otherwise starve the threads that must send the first token (ours, the client's,
    cloudflared's). On 2 cores this took the median time to the first streamed token from 2.9
    to 1.6-1.8 ms in a side-by-side probe, at no cost in tokens/s (README, Performance)."""

    def __init__(self, engine: Engine, gen_request: GenerationRequest) -> None:
        self._cancel = threading.Event()
        self._first_text_passed = threading.Event()
        self._events = engine.generate(gen_request, self._cancel, self._first_text_passed, tick=CHECK_SECONDS)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._handed_over = False  # the thread stopped at Started: the rest is read by the response
        self._direct = False  # the response's thread reads the generation itself
        self._thread = threading.Thread(target=self._wait_in_line, name="llm-magic-request", daemon=True)
        self._thread.start()

    def _wait_in_line(self) -> None:
        try:
            for event in self._events:
                if isinstance(event, Started):
                    # From here the response's own thread reads the events: one hand-over less
                    # per token than relaying them through this thread.
                    self._handed_over = True
                    self._queue.put(event)
                    return
                self._queue.put(event)
                if self._cancel.is_set():
                    break
        except BaseException as exc:  # handed to the request thread, which answers with it
            self._queue.put(_Failure(exc))
        try:
            self._events.close()
        finally:
            self._queue.put(_END)

    def get(self, timeout: float) -> Event | object | None:
        """The next event, ``_QUIET`` after ``timeout`` s without one, ``None`` at the end."""
        if self._direct:  # the engine itself says QUIET after each CHECK_SECONDS
            event = next(self._events, None)
            return _QUIET if event is QUIET else event
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return _QUIET
        if item is _END:
            return None
        if isinstance(item, _Failure):
            raise item.exc
        if isinstance(item, Started):
            self._thread.join()  # it returns right after handing over
            self._direct = True
        return item

    def events(self, keepalive: float, gone: Callable[[], bool], first: Event | None = None) -> Iterator[Event]:
        """The events, with ``KEEPALIVE`` after each ``keepalive`` s of silence; ends early when
        ``gone()`` says the client left (checked every ``CHECK_SECONDS``)."""
        try:
            if first is not None:
                yield first
            quiet_since = checked = time.monotonic()
            while True:
                event = self.get(CHECK_SECONDS)
                now = time.monotonic()
                if now - checked >= CHECK_SECONDS:
                    checked = now
                    if gone():
                        log.info("the client left; generation stopped")
                        return
                if event is None:
                    return
                if event is _QUIET:
                    if now - quiet_since >= keepalive:
                        quiet_since = now
                        yield KEEPALIVE
                    continue
                quiet_since = now
                yield event  # type: ignore[misc]
                if isinstance(event, (str, ChoiceDelta)):  # the consumer is back for more: it passed it on
                    self._first_text_passed.set()
        finally:
            self.close()

    def cancel(self) -> None:
        """Withdraw the generation, from any thread; whoever reads it sees it end."""
        self._cancel.set()
        self._first_text_passed.set()

    def close(self) -> None:
        self.cancel()
        self._thread.join(timeout=1.0)  # it leaves the line at once once cancelled
        if self._handed_over and not self._thread.is_alive():
            self._withdraw()

    def _withdraw(self) -> None:
        """Read the cancelled generation to its end. The compute thread lets go of its slot at
        its next step (the one under way cannot be stopped), and only then does the generation
        end and give its seat back: /health, the next request and the request counts then agree
        with what llama.cpp is doing (closing the generation at once gave the seat back while the
        step ran on, so on a busy machine the next request found the slot still taken)."""
        deadline = time.monotonic() + WITHDRAW_SECONDS
        try:
            for _ in self._events:  # QUIET every CHECK_SECONDS until it ends
                if time.monotonic() > deadline:
                    log.warning("a withdrawn generation did not end within %.0f s", WITHDRAW_SECONDS)
                    break
        except LLMMagicError:  # it failed as it was withdrawn: nobody is left to tell
            pass
        finally:
            self._events.close()


def _start(engine: Engine, gen_request: GenerationRequest, keepalive: float) -> tuple[Started | None, Iterator[Event]]:
    """Start a generation and wait up to ``keepalive`` s for its ``Started`` event, so that
    every refusal (model not allowed, busy, prompt too long) becomes an HTTP error status. If the
    model is still busy by then, answer 200 and keep the line alive; later errors then travel in
    the body (an SSE error event, or a JSON error object)."""
    pump = _Pump(engine, gen_request)
    gone = _client_gone_check()
    deadline = time.monotonic() + keepalive
    try:
        while (first := pump.get(CHECK_SECONDS)) is _QUIET and time.monotonic() < deadline:
            if gone():  # it left while waiting in the queue: never run it
                raise _ClientGone()
    except BaseException:
        pump.close()
        raise
    if isinstance(first, Started):
        return first, pump.events(keepalive, gone)
    return None, pump.events(keepalive, gone, KEEPALIVE)


class _Fanout:
    """The prompts of one ``/v1/completions`` list, each its own generation, merged into one
    answer: prompt i's choices take the indices i*n to i*n + n - 1, as OpenAI numbers them. At
    most as many run at once as the host has slots for (each holds ``n``), the rest following
    as they finish, so a long list neither fills the queue nor is refused as busy."""

    def __init__(self, engine: Engine, gen_request: GenerationRequest, gone: Callable[[], bool]) -> None:
        self._requests = [dataclasses.replace(gen_request, prompt=p, prompts=()) for p in gen_request.prompts]
        self._n = gen_request.n
        self._gone = gone
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (prompt index, event, _Failure or _END)
        self._lock = threading.Lock()
        self._next = 0  # the next prompt to start
        self._pumps: list[_Pump] = []
        self._cancelled = False
        self._started = 0
        self._first: Started | None = None
        self._failure: BaseException | None = None
        self._changed = threading.Condition(self._lock)  # a prompt started or failed
        self._wave = max(1, min(len(self._requests), engine.parallel // max(1, self._n)))
        self._threads = [threading.Thread(target=self._work, args=(engine,), name="llm-magic-prompt", daemon=True)
                         for _ in range(self._wave)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def start(cls, engine: Engine, gen_request: GenerationRequest,
              keepalive: float) -> tuple[Started | None, Iterator[Event]]:
        """As ``_start``: refusals of the prompts that start at once (too long, busy, ...)
        become an HTTP error status, waiting up to ``keepalive`` s for them."""
        fanout = cls(engine, gen_request, _client_gone_check())
        deadline = time.monotonic() + keepalive
        try:
            with fanout._changed:
                while fanout._failure is None and fanout._started < fanout._wave and time.monotonic() < deadline:
                    fanout._changed.wait(CHECK_SECONDS)
                    if fanout._gone():
                        raise _ClientGone()
                if fanout._failure is not None:
                    raise fanout._failure
        except BaseException:
            fanout.close()
            raise
        ready = fanout._started >= fanout._wave
        return fanout._first, fanout.events(keepalive, None if ready else KEEPALIVE)

    def _take(self) -> int | None:
        """The next prompt to run; None once there is none, or the answer was given up."""
        with self._lock:
            if self._cancelled or self._next >= len(self._requests):
                return None
            self._next += 1
            return self._next - 1

    def _work(self, engine: Engine) -> None:
        """One of ``_wave`` threads: run prompts one after another, passing their events on."""
        while (index := self._take()) is not None:
            pump = _Pump(engine, self._requests[index])
            with self._lock:
                self._pumps.append(pump)
                if self._cancelled:  # the answer was given up as this one started
                    pump.cancel()
            try:
                for event in pump.events(float("inf"), lambda: False):  # the response's thread watches
                    if isinstance(event, Started):
                        with self._changed:
                            self._first, self._started = self._first or event, self._started + 1
                            self._changed.notify_all()
                    self._queue.put((index, event))
            except BaseException as exc:  # handed to the response's thread, which answers with it
                with self._changed:
                    self._failure = self._failure or exc
                    self._changed.notify_all()
                self._queue.put((index, _Failure(exc)))
                return
            self._queue.put((index, _END))

    def events(self, keepalive: float, first: Event | None) -> Iterator[Event]:
        """The merged events: one ``Started``, every prompt's text as ``ChoiceDelta``, then one
        ``Completion`` holding every choice; ``KEEPALIVE`` after each ``keepalive`` s of silence.
        Ends early when the client left."""
        try:
            if first is not None:
                yield first
            done: dict[int, Completion] = {}
            ended = 0
            started_passed = False
            quiet_since = checked = time.monotonic()
            while ended < len(self._requests):
                try:
                    index, item = self._queue.get(timeout=CHECK_SECONDS)
                except queue.Empty:
                    index, item = -1, _QUIET
                now = time.monotonic()
                if now - checked >= CHECK_SECONDS:
                    checked = now
                    if self._gone():
                        log.info("the client left; generation stopped")
                        return
                if item is _QUIET:
                    if now - quiet_since >= keepalive:
                        quiet_since = now
                        yield KEEPALIVE
                    continue
                quiet_since = now
                if isinstance(item, _Failure):
                    raise item.exc
                if item is _END:
                    ended += 1
                elif isinstance(item, Completion):
                    done[index] = item
                elif isinstance(item, Started) and not started_passed:
                    started_passed = True
                    yield item
                elif isinstance(item, ChoiceDelta):
                    yield ChoiceDelta(index * self._n + item.index, item.text)
                elif isinstance(item, str):
                    yield ChoiceDelta(index * self._n, item)
            yield self._merged(done)
        finally:
            self.close()

    def _merged(self, done: dict[int, Completion]) -> Completion:
        """One completion for the whole list: every choice, usage summed."""
        results = [done[i] for i in sorted(done)]
        choices = tuple(dataclasses.replace(choice, index=i * self._n + choice.index, choices=())
                        for i in sorted(done) for choice in done[i].choices or (done[i],))
        timings: dict[str, float] = {}
        for result in results:  # counts add up; the times overlap, as the prompts ran side by side
            for key, value in result.timings.items():
                timings[key] = timings.get(key, 0) + value if key.endswith("_n") else max(timings.get(key, 0), value)
        for what in ("prompt", "predicted"):
            if f"{what}_ms" in timings and timings[f"{what}_ms"] > 0:
                timings[f"{what}_per_second"] = round(timings.get(f"{what}_n", 0) / timings[f"{what}_ms"] * 1000, 2)
        return dataclasses.replace(
            choices[0], choices=choices, timings=timings,
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            cached_tokens=sum(r.cached_tokens for r in results))

    def close(self) -> None:
        """Give the answer up: no prompt starts any more, and those running are withdrawn."""
        with self._lock:
            self._cancelled = True
            pumps = list(self._pumps)
        for pump in pumps:
            pump.cancel()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=1.0)  # each leaves once its prompt is withdrawn


class _ClientGone(Exception):
    """The client closed its connection before its answer began to be sent."""


def _client_gone_check() -> Callable[[], bool]:
    """A check of whether this request's client has closed its connection: its socket reads
    as end-of-file (an HTTP client sends nothing more while it waits for its answer)."""
    sock = request.environ.get(SOCKET_KEY)

    def gone() -> bool:
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


class _Done:
    """The result of work done in the background (``_in_background``)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _in_background(work: Callable[[threading.Event], Any], gone: Callable[[], bool]) -> Iterator[object]:
    """Run ``work(cancel)`` in a thread of its own: ``_QUIET`` every ``CHECK_SECONDS`` while it
    runs, then its result as ``_Done`` (or its error raised). A client that leaves sets
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
                yield _QUIET
        if "error" in box:
            raise box["error"]
        yield _Done(box["value"])
    finally:
        cancel.set()
        thread.join(10)  # it stops at its next check (an embedding group)


def _json_response(events: Iterator[Any], render: Callable[[Any], dict], keepalive: float,
                   final: type = Completion) -> Response:
    """A non-streaming answer. One that is ready within ``keepalive`` seconds goes out as plain
    JSON (errors keep their status, the connection stays open for the next request). A longer
    one becomes a stream: a space every ``keepalive`` seconds keeps proxies from cutting the
    connection (leading whitespace is valid JSON) and notices a client that left, then the JSON.
    ``final``: the type of the event that is the answer (``render`` makes its JSON)."""
    shape = _error_shape()
    deadline = time.monotonic() + keepalive
    try:
        for event in events:
            if isinstance(event, final):
                return Response(json.dumps(render(event), ensure_ascii=False), mimetype="application/json")
            if time.monotonic() >= deadline:
                break
        else:  # the events ended without an answer: the client left
            raise _ClientGone()
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


def _sse_response(chunks: Iterator[str], events: Iterator[Event]) -> Response:
    """A streaming answer; ``events`` (what ``chunks`` renders) is closed with it, so that a
    client that leaves stops the generation."""
    shape = _error_shape()

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
