"""Connection details and copy-paste client snippets, as printed by the host."""

from __future__ import annotations

import json
import shlex
from typing import Any, Mapping, Sequence


def connection_text(url: str, token: str | None, model: str, public_url: str | None = None,
                    tunnel: str | None = None, *, streams: bool = True, device: Mapping[str, Any] | None = None,
                    warnings: Sequence[str] = ()) -> str:
    """The block a host shows once it is ready: where it is, the token, the device, how to use it.

    ``streams=False`` (the tunnel delivers a stream all at once) makes the snippets ask for whole
    answers, which then arrive as fast as they can, instead of a stream that looks frozen.
    ``device``: the server's ``device``, ``gpu_layers`` and ``memory`` (see ``/health``)."""
    target = public_url or url
    lines = [f"llm_magic is serving {model}", f"  Local URL:  {url}"]
    if public_url:
        lines.append(f"  Public URL: {public_url}")
    if tunnel:
        lines.append(f"  Tunnel:     {tunnel}")
    if device and device.get("device"):
        parts = [str(device["device"])]
        if device.get("gpu_layers"):
            parts.append(f"layers on the GPU: {device['gpu_layers']}")
        if device.get("memory"):
            parts.append(str(device["memory"]))
        lines.append("  Device:     " + "; ".join(parts))
    lines.append(f"  Token:      {token}" if token else "  Token:      none (anyone who can reach the URL may use it)")
    lines += [f"warning: {line}" for line in warnings]
    if not streams:
        lines.append("Streaming:  the tunnel delivers a streamed answer all at once, so the snippets below ask for "
                     "whole answers")
    snippets = client_snippets(target, token, streams=streams).splitlines()
    lines += ["", "Use it from:", *("  " + line for line in snippets)]
    return "\n".join(lines)


def token_option(token: str) -> str:
    """``--token T`` for a command line: shell-quoted, and as ``--token=T`` when T starts with
    '-' (an option parser would take ``--token -x`` for two options)."""
    quoted = shlex.quote(token)
    return f"--token={quoted}" if token.startswith("-") else f"--token {quoted}"


def agent_snippets(url: str, token: str | None) -> list[str]:
    """Claude Code (Anthropic's Messages API, base URL without /v1; it wants a key even where
    the host takes none) and Codex CLI (a Responses provider given with ``-c``, as the
    ``[model_providers.llm_magic]`` table of its config.toml would; the token from an env var)."""
    key = shlex.quote(token or "none")
    provider = {"name": "llm_magic", "base_url": url + "/v1", "wire_api": "responses",
                **({"env_key": "LLM_MAGIC_TOKEN"} if token else {})}
    table = "{" + ", ".join(f"{name} = {json.dumps(value)}" for name, value in provider.items()) + "}"
    codex_env = f"LLM_MAGIC_TOKEN={shlex.quote(token)} " if token else ""
    return [
        f"claude:   ANTHROPIC_BASE_URL={shlex.quote(url)} ANTHROPIC_API_KEY={key} claude",
        f"codex:    {codex_env}codex -c model_provider=llm_magic -c {shlex.quote('model_providers.llm_magic=' + table)}",
    ]


def client_snippets(url: str, token: str | None, *, streams: bool = True) -> str:
    """Short examples for the browser, Jupyter, the terminal, curl, requests (the seed's
    payload), the openai SDK, llm_magic and the coding agents. Tokens are quoted for the shell
    or for Python."""
    auth = f" -H {shlex.quote('Authorization: Bearer ' + token)}" if token else ""
    token_arg = f" {token_option(token)}" if token else ""
    token_field = f"'token': {token!r}, " if token else ""
    api_key = repr(token or "none")
    no_stream = "" if streams else "  then  %config LLMMagics.stream = False"
    return "\n".join([
        f"browser:  open {url} to chat" + (" (paste the token once)" if token else ""),
        f"Jupyter:  %load_ext llm_magic  then  %llm connect {shlex.quote(url)}{token_arg}{no_stream}",
        f"terminal: llm-magic ask --url {shlex.quote(url)}{token_arg}{'' if streams else ' --no-stream'} 'Hello!'",
        f"curl:     curl {shlex.quote(url + '/v1/chat/completions')}{auth} -H 'Content-Type: application/json' "
        """-d '{"messages": [{"role": "user", "content": "Hello!"}]}'""",
        f"requests: requests.post({url + '/api'!r}, "
        f"json={{{token_field}'inputs': 'Hello!', 'parameters': {{}}}}).json()",
        f"openai:   OpenAI(base_url={url + '/v1'!r}, api_key={api_key})",
        f"python:   llm_magic.Client({url!r}" + (f", token={token!r})" if token else ")"),
        *agent_snippets(url, token),
    ])
