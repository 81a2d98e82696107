"""GBNF grammars for llama.cpp: JSON Schema and tool calls as grammars, checked in a child
process before they reach the engine.
"""
