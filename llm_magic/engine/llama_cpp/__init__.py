"""The llama.cpp backend: models loaded in-process with llama-cpp-python's low-level API,
continuous batching, sampling, decoding, embeddings and GBNF grammars.
"""
