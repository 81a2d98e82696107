"""Server-sent events: the framing every streamed answer uses."""

from __future__ import annotations

import json
from typing import Any


def sse(data: Any) -> str:
    """One server-sent event carrying JSON (or the literal ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")
SSE_KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: every client ignores it
