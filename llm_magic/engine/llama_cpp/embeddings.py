"""Embeddings: one vector per input, from a llama.cpp context made for them.

The context is created on an already loaded model (``llama_init_from_model``), so the weights
are shared with the generating context and never loaded twice. Each input is one sequence,
pooled (the model's own pooling; mean pooling for a model that has none, such as a chat model)
and L2-normalised, as OpenAI's embeddings are. Short inputs are packed, up to ``SEQUENCES`` of
them in one decode; the backend hands the compute thread one such group at a time, so that the
generations running go on between two groups. Called from the engine's compute thread only.
Imports llama_cpp lazily, like ``loading.py``.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Sequence

from llm_magic.errors import EngineError, ModelLoadError

SEQUENCES = 16  # inputs computed together in one decode


def packed(inputs: Sequence[Sequence[int]], n_tokens: int) -> list[list[Sequence[int]]]:
    """``inputs`` in order, in groups of at most ``SEQUENCES`` inputs and ``n_tokens`` tokens
    (an input longer than that alone), each of which ``EmbeddingContext.embed_many`` takes."""
    groups: list[list[Sequence[int]]] = []
    size = 0
    for tokens in inputs:
        if not groups or len(groups[-1]) == SEQUENCES or size + len(tokens) > n_tokens:
            groups.append([])
            size = 0
        groups[-1].append(tokens)
        size += len(tokens)
    return groups


class EmbeddingContext:
    """An embedding context on a loaded ``llama_model``; ``close()`` frees it (not the model)."""

    def __init__(self, model: Any, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._model = model  # llama_model pointer; owned by whoever loaded it
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx  # a whole input in one batch
        params.n_seq_max = SEQUENCES
        params.kv_unified = True  # any one input may use the whole context
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

    def embed_many(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """The normalised embeddings of several token sequences (at most ``SEQUENCES``, and
        ``n_ctx`` tokens together), computed in one decode, each sequence masked from the others."""
        lib = self._lib
        total = sum(len(tokens) for tokens in inputs)
        if not inputs or len(inputs) > SEQUENCES or total > self.n_ctx or not all(inputs):
            raise ValueError("a batch of embeddings must be packed within the context")
        batch = lib.llama_batch_init(total, 0, 1)
        try:
            i = 0
            for seq, tokens in enumerate(inputs):
                for pos, token in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, True
                    batch.seq_id[i][0] = seq
                    i += 1
            batch.n_tokens = total
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            if lib.llama_decode(self._ctx, batch) != 0:
                raise EngineError("llama.cpp could not compute these embeddings")
            vectors = []
            for seq in range(len(inputs)):
                pointer = lib.llama_get_embeddings_seq(self._ctx, seq)
                vector = [float(x) for x in ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[: self.n_embd]]
                norm = math.sqrt(sum(x * x for x in vector)) or 1.0
                vectors.append([x / norm for x in vector])
        finally:
            lib.llama_batch_free(batch)
        return vectors

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
