"""Which model is in memory, and with which settings.

The host keeps one model resident for generating (never two: a switch unloads, then loads)
and, if it has an ``--embedding-model``, that one beside it. A request is served by the resident
model whenever it can be (a smaller context than the resident one fits in it); only another
file, a larger context or another GPU setting reloads, and a host without a token makes no
such switch. The caller holds every seat of the line while it asks for a switch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from llm_magic.engine.llama_cpp.batching import Scheduler
from llm_magic.engine.llama_cpp.draft_model import DraftModel, check_draft_vocabulary, vocabulary
from llm_magic.engine.llama_cpp.grammar.check import GrammarChecker
from llm_magic.engine.llama_cpp.loaded import EMBEDDING_CTX, LoadedModel
from llm_magic.engine.llama_cpp.loading import (HostSettings, ModelKey, device_info, llama_cpp_module, load_model,
                                                make_context, offload_works, place)
from llm_magic.engine.llama_cpp.placement import DEFAULT
from llm_magic.errors import InvalidRequest, ModelLoadError, ModelNotAllowed
from llm_magic.models import ModelPolicy, model_name
from llm_magic.wire.types import GenerationRequest

log = logging.getLogger("llm_magic.engine")


class Residency:
    """The resident model (``loaded``), the embedding model, and what loading them needs."""

    def __init__(self, settings: HostSettings, scheduler: Scheduler, grammars: GrammarChecker, *,
                 gpu_layers: int, policy: ModelPolicy, embedding_path: Path | None = None) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.grammars = grammars
        self.gpu_layers = gpu_layers
        self.policy = policy
        self.embedding_path = embedding_path
        self.loaded: LoadedModel | None = None
        self.loading = True  # until the first load: /health says "loading"
        self._embedding: LoadedModel | None = None  # loaded at its first request
        self._trained_ctx: dict[Path, int] = {}  # what each model loaded so far was trained for
        self._device: dict[str, str] = {}  # the resident model's device, layers offloaded, memory
        self._gpu_memory: str | None = None
        self._gpu_memory_at = 0.0
        self._placement = DEFAULT  # the resident model's GPUs
        self._draft: DraftModel | None = None  # --model-draft's, beside the resident model

    def device(self) -> dict[str, str]:
        """Where the resident model runs: ``device`` ("CPU", "CUDA0 Tesla T4"), ``gpu_layers``
        ("0 (CPU only)", "29 of 29") and ``memory`` (the model's weights and KV cache as llama.cpp
        sizes them; on a GPU also the memory in use of the GPUs it is on, asked of nvidia-smi at
        most every 10 s) and, on several GPUs or with split flags, ``placement``."""
        info = dict(self._device)
        if info.get("device", "CPU") != "CPU":
            from llm_magic.engine.llama_cpp.gpu import gpu_memory_text

            if time.monotonic() - self._gpu_memory_at > 10:
                self._gpu_memory = gpu_memory_text(self._placement.devices)
                self._gpu_memory_at = time.monotonic()
            if self._gpu_memory:
                info["memory"] += f"; {self._gpu_memory}"
        return info

    def is_resident(self, key: ModelKey) -> bool:
        return self.loaded is not None and self.loaded.key == key

    def key(self, path: Path, ctx_length: int | None = None, use_gpu: bool | None = None) -> ModelKey:
        """The settings a model is loaded with: the host's, unless the request asks otherwise."""
        gpu_layers = self.gpu_layers if use_gpu is None else (0 if not use_gpu else (self.gpu_layers or -1))
        if not offload_works():  # layers stay on the CPU whatever is asked: no reload
            gpu_layers = 0
        return ModelKey(Path(path), ctx_length or self.settings.ctx_length, gpu_layers)

    def key_for(self, path: Path, request: GenerationRequest) -> ModelKey:
        """The resident model serves a request whenever it can: a smaller context than the
        resident one fits in it, so only a larger one (up to ``max_ctx``) or another GPU setting
        reloads. Such a reload is a model switch: a host without a token makes none."""
        host_key = self.key(path)
        key = self.key(path, request.ctx_length, request.use_gpu)
        resident = self.loaded.key if self.loaded is not None else None
        if resident is not None and (resident.path, resident.gpu_layers) == (key.path, key.gpu_layers):
            if key.ctx_length <= resident.ctx_length:
                return resident
        if key.ctx_length < host_key.ctx_length:
            key = ModelKey(key.path, host_key.ctx_length, key.gpu_layers)
        trained = self._trained_ctx.get(key.path)
        if trained and key.ctx_length > max(trained, host_key.ctx_length):
            raise InvalidRequest(
                f"a context of {key.ctx_length} tokens is more than the model was trained for ({trained})")
        if key != host_key and not self.policy.has_token:
            raise ModelNotAllowed(
                "a host without a token serves its model only with the host's own settings "
                f"(context {host_key.ctx_length}, GPU {'on' if host_key.gpu_layers else 'off'}); "
                "leave options.ctx_length and options.use_gpu out")
        return key

    def ensure(self, key: ModelKey, name: str) -> LoadedModel:
        """The model for ``key``, loading it if needed (only while every seat is held)."""
        if self.loaded is not None and self.loaded.key == key:
            return self.loaded
        self.unload()  # never two models in memory
        self.loading = True
        started = time.perf_counter()
        try:
            placement = place(key, self.settings)
            if placement.reason:
                log.info("placing %s: %s", name, placement.reason)
            model = load_model(key, placement)
            try:
                context = make_context(model, key, self.settings)
                try:
                    draft = self._draft_model(model, key, first=not self._trained_ctx)
                except BaseException:
                    context.close()
                    raise
            except BaseException:
                model.close()
                raise
        finally:
            self.loading = False
        log.info("loaded %s (ctx %d, gpu layers %d, %d slots) in %.2f s", name, key.ctx_length,
                 key.gpu_layers, self.settings.parallel, time.perf_counter() - started)
        self._trained_ctx[key.path] = model.n_ctx_train()
        if key.ctx_length > model.n_ctx_train():
            log.warning("the context (%d) is larger than %s was trained for (%d): answers past that "
                        "may degrade", key.ctx_length, name, model.n_ctx_train())
        self.loaded = LoadedModel(key, name, model, self.settings, context, self.grammars)
        self._device = device_info(model, key, self.loaded.metadata, context, placement)
        self._placement, self._gpu_memory_at = placement, 0.0
        self._draft = draft
        self.scheduler.call(lambda: self.scheduler.attach(context, draft))
        return self.loaded

    def _draft_model(self, model: Any, key: ModelKey, *, first: bool) -> DraftModel | None:
        """``--model-draft``'s model for ``model``: the same vocabulary, a context of its own
        with a sequence per slot, placed by the same rule as the model (``place``: its own fit, so
        not always on the model's GPUs) with as many layers offloaded.
        One of another vocabulary is refused at the first load; at a later switch (to a model of
        another family) the host writes without drafts instead."""
        path = self.scheduler.spec.model
        if path is None or not self.scheduler.spec.enabled:
            return None
        draft_key = ModelKey(Path(path), key.ctx_length, key.gpu_layers)
        draft = load_model(draft_key, place(draft_key, self.settings))
        try:
            lib = llama_cpp_module()
            ours, theirs = vocabulary(lib, model.model), vocabulary(lib, draft.model)
            check_draft_vocabulary(ours, theirs, Path(path).name)
            context = make_context(draft, draft_key, self.settings)
        except InvalidRequest as exc:
            draft.close()
            if first:
                raise
            log.warning("%s; writing without it", exc.message)
            return None
        except BaseException:
            draft.close()
            raise
        log.info("drafting with %s", Path(path).name)
        return DraftModel(context, min(ours.size, theirs.size), draft)

    def unload(self) -> None:
        """Free the resident model, once the scheduler has let go of its context."""
        if self.loaded is not None:
            self.scheduler.call(lambda: self.scheduler.attach(None))
            self.loaded.close()
            self.loaded = None
        if self._draft is not None:
            self._draft.close()
            self._draft = None

    def embedding_model(self) -> LoadedModel:
        """The ``--embedding-model``, loaded at its first request and kept beside the resident one."""
        if self._embedding is None:
            assert self.embedding_path is not None
            key = ModelKey(self.embedding_path, EMBEDDING_CTX, self.key(self.embedding_path).gpu_layers)
            try:
                model = load_model(key, place(key, self.settings))
            except ModelLoadError as exc:
                raise ModelLoadError(f"the embedding model: {exc.message}") from None
            self._embedding = LoadedModel(key, model_name(self.embedding_path), model, self.settings)
        return self._embedding

    def close(self) -> None:
        """Free both models (the caller holds every seat)."""
        self.unload()
        if self._embedding is not None:
            self._embedding.close()
            self._embedding = None
