"""llm_magic: run an open LLM on a free GPU notebook and use it from anywhere.

``import llm_magic`` stays light: the host side (Flask, llama-cpp-python) loads only when used.
"""

from __future__ import annotations

from typing import Any

from .version import __version__

__all__ = ["ApiHost", "ChatSession", "Client", "__version__"]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext llm_magic``: register ``%llm_host``, ``%llm`` and ``%%llm``."""
    from llm_magic.notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from llm_magic.notebook.magics import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str) -> Any:
    if name == "ApiHost":
        from llm_magic.supervisor.host import ApiHost

        return ApiHost
    if name == "Client":
        from llm_magic.client.client import Client

        return Client
    if name == "ChatSession":
        from llm_magic.client.session import ChatSession

        return ChatSession
    raise AttributeError(f"module 'llm_magic' has no attribute {name!r}")
