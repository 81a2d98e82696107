"""The backend a ``ServeSettings`` asks for: llama.cpp in this process, or a running engine at
a URL. The only place that chooses; ``llm-magic serve`` builds its backend here."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from llm_magic.engine.backend import Backend
from llm_magic.errors import InvalidRequest
from llm_magic.settings import ServeSettings

ENGINE_KINDS = ("vllm", "llama-server")  # engines the host starts itself
ENGINE_START_WAIT = 30.0  # seconds a fronted engine may take to answer at start-up


@dataclass
class Built:
    """A backend and what ``serve`` says of it at start-up."""

    backend: Backend
    name: str  # the default model's name
    device: dict[str, str] = field(default_factory=dict)  # device, gpu_layers, memory, for the banner
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> None:
        """Fill in what is known once the backend is ready (where the model runs)."""
        engine: dict[str, Any] = self.backend.status().get("engine") or {}
        if engine.get("kind") == "upstream":
            self.device = {"device": f"the engine at {engine.get('url')}"}
            self.name = self.backend.default_name
        else:
            self.device = {k: engine[k] for k in ("device", "gpu_layers", "memory") if k in engine}


def build_backend(settings: ServeSettings, *, has_token: bool, model_name: str | None = None) -> Built:
    """The backend for ``settings``; a host with a token may load other models (``has_token``)."""
    if settings.engine:
        return _upstream(settings, model_name)
    return _llama_cpp(settings, has_token, model_name)


def _upstream(settings: ServeSettings, model_name: str | None) -> Built:
    engine = settings.engine or ""
    if engine in ENGINE_KINDS:
        return _launched(settings, model_name)
    if not engine.startswith(("http://", "https://")):
        raise InvalidRequest(f"'--engine' must be vllm, llama-server or the URL of an OpenAI-compatible server "
                             f"(http://HOST:PORT), not {engine!r}")
    from llm_magic.engine.upstream.backend import UpstreamBackend

    backend = UpstreamBackend(engine, key=settings.engine_key, model=settings.model, parallel=settings.slots,
                              max_queue=settings.max_queue, start_wait=ENGINE_START_WAIT)
    return Built(backend, backend.default_name)


def _launched(settings: ServeSettings, model_name: str | None) -> Built:
    """vLLM or llama-server, started by this host on a free local port and fronted."""
    from llm_magic.engine.upstream.launcher import KEY_ENV, EngineProcess, LaunchedEngine, free_port, \
        llama_server_command, vllm_command

    port = free_port()
    # a key: only this host may use the engine's port (others on the machine can reach it too);
    # in the engine's environment, since a command line is anyone's to read (ps)
    kind = settings.engine or ""
    own_args = settings.vllm_arg if kind == "vllm" else settings.llama_server_arg
    owners = given_key(own_args) or os.environ.get(KEY_ENV[kind])
    key = owners or settings.engine_key or secrets.token_urlsafe(24)
    if settings.engine == "vllm":
        if not settings.model:
            raise InvalidRequest("'--engine vllm' needs --model: a hub id (Qwen/Qwen2.5-7B-Instruct) or a local folder")
        command = vllm_command(settings.model, port, tensor_parallel=settings.tensor_parallel_size,
                               pipeline_parallel=settings.pipeline_parallel_size,
                               max_model_len=settings.max_model_len or settings.ctx,
                               gpu_memory_utilization=settings.gpu_memory_utilization,
                               extra=settings.vllm_arg)
        wanted = settings.model
    else:
        from llm_magic.models import ModelSpec, model_name as name_of, resolve_model

        spec = ModelSpec.parse(settings.model)
        path = resolve_model(spec)
        wanted = model_name or (str(spec) if spec.repo_id else name_of(path))  # its --alias
        command = llama_server_command(str(path), port, ctx=settings.ctx, parallel=settings.slots,
                                       gpu_layers=settings.gpu_layers, threads=settings.threads,
                                       extra=["--alias", wanted, *settings.llama_server_arg])
    process = EngineProcess(kind, command, port, secret=key, env={} if owners else {KEY_ENV[kind]: key})
    backend = LaunchedEngine(process, start_timeout=settings.engine_start_timeout, model=wanted, key=key,
                             parallel=settings.slots, max_queue=settings.max_queue)
    return Built(backend, wanted or process.kind)


def given_key(args: list[str]) -> str | None:
    """The ``--api-key`` the owner passed on to the engine, if any (the first of a list)."""
    for i, arg in enumerate(args):
        if arg == "--api-key" and i + 1 < len(args):
            return args[i + 1].split(",")[0]
        if arg.startswith("--api-key="):
            return arg.split("=", 1)[1].split(",")[0]
    return None


def _llama_cpp(settings: ServeSettings, has_token: bool, model_name: str | None) -> Built:
    from llm_magic.engine.llama_cpp.backend import LlamaCppBackend, gpu_offload_supported
    from llm_magic.engine.llama_cpp.gpu import offload_warning
    from llm_magic.engine.llama_cpp.placement import SplitFlags
    from llm_magic.engine.llama_cpp.speculation import SpecSettings
    from llm_magic.models import ModelPolicy, ModelSpec, model_name as name_of, resolve_model

    spec = ModelSpec.parse(settings.model)
    path = resolve_model(spec)
    name = model_name or (str(spec) if spec.repo_id else name_of(path))
    embedding = resolve_model(ModelSpec.parse(settings.embedding_model)) if settings.embedding_model else None
    draft = resolve_model(ModelSpec.parse(settings.model_draft)) if settings.model_draft else None
    backend = LlamaCppBackend(path, default_name=name, ctx_length=settings.ctx, max_ctx=settings.max_ctx,
                              gpu_layers=settings.gpu_layers, embedding_model=embedding, threads=settings.threads,
                              chat_format=settings.chat_format, max_queue=settings.max_queue,
                              parallel=settings.slots, flash_attention=settings.flash_attn,
                              batch_size=settings.batch_size, ubatch_size=settings.ubatch_size,
                              speculation=SpecSettings(settings.spec, settings.spec_draft_max, settings.spec_draft_min,
                                                       draft),
                              reasoning_format=settings.reasoning_format,
                              reasoning_budget=settings.reasoning_budget,
                              chat_template_file=settings.chat_template_file,
                              split=SplitFlags(settings.split_mode, settings.main_gpu, settings.tensor_split),
                              policy=ModelPolicy(has_token=has_token, allow_patterns=settings.allow_model))
    warning = offload_warning(gpu_offload_supported()) if settings.gpu_layers != 0 else None
    return Built(backend, name, warnings=[warning] if warning else [])
