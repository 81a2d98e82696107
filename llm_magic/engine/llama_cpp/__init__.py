"""The llama.cpp backend: models loaded in-process with llama-cpp-python's low-level API,
continuous batching, sampling, decoding, embeddings and GBNF grammars.

A request goes one way down: ``backend`` (admission, which model) → ``residency`` (loads and
switches models with ``loading``) → ``loaded`` (the model prepares the request as a ``Task``)
→ ``batching`` (the scheduler steps every task together; ``slots`` chooses their sequences)
→ ``decoding`` and ``sampling`` (each answer's tokens and text) → events back up.
"""
