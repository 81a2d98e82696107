"""Embeddings: one vector per input, from a llama.cpp context made for them.

The context is created on an already loaded model (``llama_init_from_model``), so the weights
are shared with the generating context and never loaded twice. Each input is one sequence,
pooled (the model's own pooling; mean pooling for a model that has none, such as a chat model)
and L2-normalised, as OpenAI's embeddings are. Called from the engine's compute thread only.
Imports llama_cpp lazily, like ``engine.py``.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Sequence

from .errors import InvalidRequest, ModelLoadError


class EmbeddingContext:
    """An embedding context on a loaded ``llama_model``; ``close()`` frees it (not the model)."""

    def __init__(self, model: Any, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._model = model  # llama_model pointer; owned by whoever loaded it
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx  # a whole input in one batch
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
        params.n_threads = params.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise ModelLoadError("llama.cpp could not make an embedding context for this model")
        pooling = llama_cpp.llama_pooling_type(self._ctx)
        if pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE:  # a model made for generating: mean-pool
            llama_cpp.llama_free(self._ctx)
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            self._ctx = llama_cpp.llama_init_from_model(model, params)
            if not self._ctx:
                raise ModelLoadError("llama.cpp could not make an embedding context for this model")
        self.n_ctx = n_ctx
        self.n_embd = llama_cpp.llama_model_n_embd(model)

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """The normalised embedding of one token sequence."""
        lib = self._lib
        if not tokens:
            raise InvalidRequest("an input is empty: send some text")
        if len(tokens) > self.n_ctx:
            raise InvalidRequest(f"an input is {len(tokens)} tokens but the embedding context holds {self.n_ctx}")
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(tokens)
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            if lib.llama_decode(self._ctx, batch) != 0:
                raise ModelLoadError("llama.cpp could not compute this embedding")
            pointer = lib.llama_get_embeddings_seq(self._ctx, 0)
            vector = [float(x) for x in ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[: self.n_embd]]
        finally:
            lib.llama_batch_free(batch)
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector]

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
