"""The client tier: ``Client`` and its streams, saved conversations, Python functions as tools.

HTTP through ``requests`` only; never the host side (Flask, llama_cpp, the engine or server tiers).
"""
