"""The HTTP service: the app and its routes.

``create_app(backend, token=...)`` builds the app: the seed's ``POST /api``, the OpenAI-compatible
``/v1`` routes and ``GET /health``. Every failure on every route is JSON, never HTML: in OpenAI's
shape on ``/v1`` (``param`` and a string ``code``), in the seed's (``code``: the status) elsewhere.
A body is read only when sent as ``application/json``: a browser sends anything else (a form,
``text/plain``) from any web page without asking the host first, so no page a user visits can
drive a host on their machine. The app is written against ``engine.backend.Backend`` alone; the HTTP server under it is
``httpserver.HttpServer``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from flask import Flask, Response, g, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException, NotFound

from llm_magic.engine.backend import Backend
from llm_magic.errors import InvalidRequest, LLMMagicError, ModelNotFound
from llm_magic.server.anthropic_routes import register_anthropic
from llm_magic.server.fanout import Fanout
from llm_magic.server.generation import start_generation
from llm_magic.server.httpserver import MAX_BODY_BYTES, loggable
from llm_magic.server.inbound import ClientGone, authorize, client_gone_check, json_body
from llm_magic.server.metrics import REQUEST_ID_HEADER, Meter, install_log_filter, prompt_text, request_id_from
from llm_magic.server.replies import SSE_HEADERS, Done, error_response, in_background, json_response, sse_response
from llm_magic.settings import DEFAULTS
from llm_magic.version import __version__
from llm_magic.wire.openai import (
    DEFAULT_MODEL_ALIASES, OpenAIRenderer, embeddings_answer, parse_chat, parse_completion, parse_embeddings,
)
from llm_magic.wire.responses import ResponsesRenderer, parse_responses
from llm_magic.wire.seed import api_answer, api_stream, parse_api_request
from llm_magic.wire.sse import sse
from llm_magic.wire.types import GenerationRequest

log = logging.getLogger("llm_magic.server")

KEEPALIVE_SECONDS = DEFAULTS.keepalive  # well inside Cloudflare's 100 s idle limit
ROUTES = ("GET / (the chat page), POST /api, POST /v1/chat/completions, POST /v1/completions, "
          "POST /v1/responses, POST /v1/messages, POST /v1/messages/count_tokens, POST /v1/embeddings, "
          "GET /v1/models, GET /health, POST /health/stream, "
          "GET /metrics, GET /slots")
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

FINGERPRINT = f"llm_magic-{__version__}"  # OpenAI's system_fingerprint: which build answered


def create_app(
    backend: Backend,
    *,
    token: str | None = None,
    max_body: int = MAX_BODY_BYTES,
    keepalive: float = KEEPALIVE_SECONDS,
    extra_status: Callable[[], dict] | None = None,
    cors: Sequence[str] = (),
    log_prompts: bool = False,
) -> Flask:
    """The llm_magic Flask app around ``backend``; ``token=None`` serves without a token.

    ``keepalive``: seconds of silence after which a busy response sends a keep-alive (an SSE
    comment, or leading whitespace before a JSON body). ``extra_status``: more for ``/health``.
    ``cors``: origins (or ``*``) whose browser pages may call the host; none by default.
    ``log_prompts``: the access log shows the start of each prompt (never, by default).
    """
    app = Flask("llm_magic", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False  # Flask's own OPTIONS answer is empty HTML
    app.url_map.merge_slashes = False  # werkzeug would answer '//' with an HTML redirect
    meter = Meter(backend, extra_status, log_prompts)
    install_log_filter()
    app.extensions["llm_magic"] = {"backend": backend, "token": token, "started": int(time.time()), "meter": meter}
    if cors:
        from flask_cors import CORS

        # The token travels in a header, never a cookie: no credentials mode is needed.
        CORS(app, origins=list(cors), allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"],
             max_age=600,
             expose_headers=["Retry-After", REQUEST_ID_HEADER])

    @app.before_request
    def begin() -> None:  # first of all: every response, errors too, carries the request's id
        rule = request.url_rule
        g.track = meter.begin(request_id_from(request.headers.get(REQUEST_ID_HEADER), token), request.method,
                              request.path, rule.rule if rule is not None else "unmatched",
                              request.remote_addr or "-")

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
    def end(response: Response) -> Response:
        """The id in the header; the request counted, and its one log line written (never a
        token, nor prompt text unless --log-prompts), once its response is over: a stream's too."""
        track = g.get("track")
        if track is not None:
            response.headers[REQUEST_ID_HEADER] = track.id
            status = response.status_code
            if response.is_streamed:  # counted once it is sent, or its client is gone
                response.call_on_close(lambda: meter.finish(track, status))
            else:
                meter.finish(track, status)
        return response

    def tagged(gen_request: GenerationRequest) -> GenerationRequest:
        """The request under its id (the backend's slots show it), its prompt kept for the log if asked."""
        if log_prompts:
            g.track.prompt = prompt_text(gen_request)
        return dataclasses.replace(gen_request, request_id=g.track.id)

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
        status = backend.status()
        status.update(version=__version__, auth=token is not None, decode_tokens_per_second=meter.rate.rate())
        if extra_status is not None:
            status.update(extra_status())
        return status

    @app.get("/metrics")
    def metrics() -> Any:
        """Prometheus' text format (a scrape sends the token as its bearer token)."""
        authorize(token, None, body_token=False)
        return Response(generate_latest(meter.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.get("/slots")
    def slots() -> Any:
        """Each slot: idle, reading a prompt or writing; its cache; the request it serves."""
        authorize(token, None, body_token=False)
        return meter.slots()

    @app.post("/health/stream")
    def stream_probe() -> Any:
        """A few timed events, as a streamed answer is sent: whoever holds the token (the host,
        through its own tunnel) can check that a stream arrives as it is sent."""
        authorize(token, None, body_token=False)

        def events() -> Iterator[str]:
            for i in range(PROBE_EVENTS):
                if i:
                    time.sleep(PROBE_INTERVAL)
                yield sse({"probe": i, "of": PROBE_EVENTS, "interval": PROBE_INTERVAL})
            yield sse("[DONE]")

        return Response(events(), mimetype="text/event-stream", headers=SSE_HEADERS)

    @app.post("/api")
    def api() -> Any:
        body = json_body(max_body)
        authorize(token, body)
        gen_request = tagged(parse_api_request(body))
        _, events = start_generation(backend, gen_request, keepalive, g.track)
        if gen_request.stream:
            return sse_response(api_stream(events), events)
        return json_response(events, api_answer, keepalive)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Any:
        return _openai(parse_chat, chat=True)

    @app.post("/v1/completions")
    def completions() -> Any:
        return _openai(parse_completion, chat=False)

    def _openai(parse: Callable[..., GenerationRequest], chat: bool) -> Any:
        return _generation(parse, lambda body, gen_request, model: OpenAIRenderer(
            chat=chat, model=model, include_usage=gen_request.include_usage, fingerprint=FINGERPRINT, n=gen_request.n))

    @app.post("/v1/responses")
    def responses() -> Any:
        return _generation(parse_responses, lambda body, gen_request, model: ResponsesRenderer(body, model=model))

    def _generation(parse: Callable[..., GenerationRequest], make_renderer: Callable[..., Any]) -> Any:
        """An OpenAI-style generation route: the token in the header, the body parsed by
        ``parse``, the answer rendered, whole or streamed, by ``make_renderer``'s renderer."""
        body = json_body(max_body)
        authorize(token, body, body_token=False)
        gen_request = tagged(parse(body, model_ids=(backend.default_name,)))
        if len(gen_request.prompts) > 1:  # a list of prompts: one generation each, merged
            started, events = Fanout.start(backend, gen_request, keepalive, g.track)
        else:
            started, events = start_generation(backend, gen_request, keepalive, g.track)
        renderer = make_renderer(body, gen_request, started.model if started else backend.default_name)
        if gen_request.stream:
            return sse_response(renderer.stream(events), events)
        return json_response(events, renderer.answer, keepalive)

    @app.post("/v1/embeddings")
    def embeddings() -> Any:
        body = json_body(max_body)
        authorize(token, body, body_token=False)
        wanted = parse_embeddings(body, model_ids=(backend.default_name, *backend.embedding_names))
        if wanted.model is not None:
            raise InvalidRequest("'model': embeddings come from the host's own model (or its "
                                 "--embedding-model); leave 'model' out or send the listed id")
        dimensions = body.get("dimensions")
        track = g.track

        def render(done: Done) -> dict:
            result = done.value
            track.prompt_tokens, track.completed = result.prompt_tokens, True
            if dimensions is not None and result.vectors and dimensions != len(result.vectors[0]):
                raise InvalidRequest(f"'dimensions': this model's embeddings have {len(result.vectors[0])}")
            return embeddings_answer(result.vectors, result.model, result.prompt_tokens, wanted.base64)

        # computed beside the request's thread, so that the response can keep the line alive
        # and stop the work when the client leaves
        work = in_background(lambda cancel: backend.embed(wanted.inputs, cancel), client_gone_check())
        return json_response(work, render, keepalive, final=Done)

    def model_objects() -> dict[str, dict]:
        created = app.extensions["llm_magic"]["started"]
        names = dict.fromkeys([backend.default_name, backend.model or backend.default_name, *backend.embedding_names])
        return {name: {"id": name, "object": "model", "created": created, "owned_by": "llm_magic"} for name in names}

    def model_object(model_id: str) -> dict | None:
        """A listed model, or the default one under the name every route accepts for it."""
        objects = model_objects()
        return objects.get(backend.default_name) if model_id in DEFAULT_MODEL_ALIASES else objects.get(model_id)

    @app.get("/v1/models")
    def models() -> Any:
        authorize(token, None, body_token=False)
        return {"object": "list", "data": list(model_objects().values())}

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str) -> Any:
        authorize(token, None, body_token=False)
        found = model_object(model_id)
        if found is None:
            raise ModelNotFound(f"no model '{loggable(model_id, 200)}' here; GET /v1/models lists them")
        return found

    register_anthropic(app, backend, token=token, max_body=max_body, keepalive=keepalive, log_prompts=log_prompts)

    @app.errorhandler(LLMMagicError)
    def handle_error(exc: LLMMagicError) -> Any:
        return error_response(exc)

    @app.errorhandler(ClientGone)
    def handle_gone(exc: ClientGone) -> Any:
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
        return error_response(err)

    @app.errorhandler(Exception)
    def handle_bug(exc: Exception) -> Any:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(LLMMagicError(f"internal error ({type(exc).__name__}); see the host's log"))

    return app


