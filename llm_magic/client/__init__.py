"""The client tier: ``Client`` and its streams, chat sessions that run tool calls, saved
conversations, Python functions as tools.

HTTP through ``requests`` only; never the host side (Flask, llama_cpp, the engine or server tiers).
"""

from llm_magic.client.client import Answer, Client, Delta, Stream
from llm_magic.client.python_tools import ToolBox
from llm_magic.client.session import ChatSession, TurnInterrupted

__all__ = ["Answer", "ChatSession", "Client", "Delta", "Stream", "ToolBox", "TurnInterrupted"]
