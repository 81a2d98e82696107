"""The wire tier: pure Python request, result and event types, field validation, and every wire
format the host speaks (the seed ``/api``, OpenAI chat and completions, Responses, SSE, tool-call
formats). No Flask, no llama_cpp.
"""
