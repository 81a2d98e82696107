"""Connection details and copy-paste client snippets, as printed by the host."""

from __future__ import annotations


def connection_text(url: str, token: str | None, model: str, public_url: str | None = None,
                    tunnel: str | None = None) -> str:
    """The block a host prints once it is ready: where it is, the token, how to use it."""
    target = public_url or url
    lines = [f"llm_magic is serving {model}", f"  Local URL:  {url}"]
    if public_url:
        lines.append(f"  Public URL: {public_url}")
    if tunnel:
        lines.append(f"  Tunnel:     {tunnel}")
    lines.append(f"  Token:      {token}" if token else "  Token:      none (anyone who can reach the URL may use it)")
    lines += ["", "Use it from:", *("  " + line for line in client_snippets(target, token).splitlines())]
    return "\n".join(lines)


def client_snippets(url: str, token: str | None) -> str:
    """Short examples for curl, requests (seed payload), the openai SDK and llm_magic."""
    auth = f' -H "Authorization: Bearer {token}"' if token else ""
    token_arg = f" --token {token}" if token else ""
    token_field = f"'token': '{token}', " if token else ""
    api_key = token or "none"
    return "\n".join([
        f"browser:  open {url} to chat" + (" (paste the token once)" if token else ""),
        f"Jupyter:  %load_ext llm_magic  then  %llm connect {url}{token_arg}",
        f"curl:     curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
        """-d '{"messages": [{"role": "user", "content": "Hello!"}]}'""",
        f"requests: requests.post('{url}/api', json={{{token_field}'inputs': 'Hello!', 'parameters': {{}}}}).json()",
        f"openai:   OpenAI(base_url='{url}/v1', api_key='{api_key}')",
        f"python:   llm_magic.Client('{url}'" + (f", token='{token}')" if token else ")"),
    ])
