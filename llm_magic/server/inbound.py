"""Reading a request: its JSON body (declared as JSON, bounded, valid UTF-8, no lone
surrogates), its token, and whether its client is still there."""

from __future__ import annotations

import hmac
import json
import select
import socket
from typing import Any, Callable

from flask import request

from llm_magic.errors import AuthenticationError, InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from llm_magic.server.httpserver import SOCKET_KEY, BodyTooLarge, loggable


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
        raise ClientGone() from None
    if len(raw) > max_body:
        raise too_large
    return raw


def json_body(max_body: int) -> Any:
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


def authorize(token: str | None, body: Any, body_token: bool = True) -> None:
    """Check the token from the ``Authorization: Bearer`` header, the ``x-api-key`` header
    (all the anthropic SDK sends; Claude Code sends both) or the JSON body (seed style). One
    that matches is enough: a client may send a placeholder in the other header."""
    if token is None:
        return
    supplied: list[Any] = []
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        supplied.append(header[7:].strip())
    supplied.append(request.headers.get("x-api-key", "").strip())
    if body_token and isinstance(body, dict) and "token" in body:
        supplied.append(body["token"])
    supplied = [s for s in supplied if s is not None and s != ""]
    if not supplied:
        where = "as 'token' in the JSON body, " if body_token else ""
        raise AuthenticationError(
            f"this host needs its access token: send it {where}as the header "
            "'Authorization: Bearer <token>' (the api_key of OpenAI clients) or as 'x-api-key: <token>' "
            "(Anthropic clients)")
    expected = token.encode()
    matches = [isinstance(s, str) and hmac.compare_digest(s.encode(), expected) for s in supplied]
    if not any(matches):
        raise AuthenticationError("wrong token: copy it again from the host's output")


class ClientGone(Exception):
    """The client closed its connection before its answer began to be sent."""


def client_gone_check() -> Callable[[], bool]:
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
