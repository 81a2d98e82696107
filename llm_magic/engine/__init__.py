"""The engine tier: the ``Backend`` interface the server is written against, and the backends.

``engine/llama_cpp/`` is the only package that imports llama_cpp.
"""
