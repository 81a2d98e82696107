"""Bringing a GGUF model into memory with llama.cpp, and what is known of it once there.

The weights are loaded alone (llama-cpp-python's ``LlamaModel``), without its ``Llama`` wrapper:
the backend makes its own contexts (``BatchContext`` for generating, an embedding context when
asked), so that one set of weights serves every slot. Also here: the device a model ended up
on, and the chat formatters, which llama-cpp-python only hands out inside completion handlers.
With the backend's other modules, the only code that imports ``llama_cpp`` (lazily, so that
the package imports without it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_magic.engine.llama_cpp.batching import FLASH_ATTENTION, BatchContext
from llm_magic.engine.llama_cpp.cpu import NO_AMX_CMAKE_ARGS, build_uses_amx, extra_buffers_crash
from llm_magic.engine.llama_cpp.placement import DEFAULT, Placement, SplitFlags, check, choose, estimate, \
    kv_bytes_per_cell, unused_on_cpu
from llm_magic.errors import InvalidRequest, LLMMagicError, ModelLoadError
from llm_magic.models import embedded_model_path
from llm_magic.wire.reasoning import REASONING_FORMATS

log = logging.getLogger("llm_magic.engine")


@dataclass(frozen=True)
class ModelKey:
    """The settings a model is loaded with: another key for the same file means a reload."""

    path: Path
    ctx_length: int
    gpu_layers: int


@dataclass(frozen=True)
class HostSettings:
    """The host owner's settings, the same for every model the host loads."""

    ctx_length: int
    threads: int
    parallel: int
    flash_attention: str = "auto"
    batch_size: int = 2048  # the most tokens one decode takes (llama.cpp's n_batch)
    ubatch_size: int = 512  # the most it computes at once (n_ubatch)
    kv_unified: bool = False  # one KV cache shared by the slots: less memory, answers may vary
    chat_format: str | None = None  # a named prompt format instead of each GGUF's own template
    chat_template: str | None = None  # a Jinja chat template used instead of each GGUF's (--chat-template-file)
    reasoning_format: str = "auto"  # auto | none | deepseek (wire/reasoning.py)
    reasoning_budget: int = -1  # the most reasoning tokens per answer; -1 unlimited
    split: SplitFlags = field(default_factory=SplitFlags)  # --split-mode, --tensor-split, --main-gpu as given

    def __post_init__(self) -> None:
        if self.flash_attention not in FLASH_ATTENTION:
            raise ValueError(f"flash_attention must be one of {', '.join(FLASH_ATTENTION)}")
        if self.reasoning_format not in REASONING_FORMATS:
            raise InvalidRequest(f"'--reasoning-format' must be one of {', '.join(REASONING_FORMATS)}")
        if self.batch_size < self.parallel:  # each step holds every answer's next token
            raise InvalidRequest(f"'--batch-size' ({self.batch_size}) must be at least '--parallel' ({self.parallel})")


def llama_cpp_module() -> Any:
    """llama-cpp-python, or the error that says how to install it."""
    # CUDA numbers GPUs fastest first unless told otherwise; in PCI bus order, as nvidia-smi
    # numbers them, llama.cpp's CUDA1 is nvidia-smi's GPU 1 and a placement means the GPU it names.
    # (Read when CUDA starts: before llama_cpp is first imported.)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(
            "serving models needs llama-cpp-python: pip install 'llm_magic[host]'") from None
    return llama_cpp


def best_thread_count() -> int:
    """Threads for generation: every core this process may use (on 2 cores,
    2 threads give ~1.5x the tokens/s of llama-cpp-python's default of cpu_count // 2)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_backend_ready = False  # llama_backend_init once per process


def load_model(key: ModelKey, placement: Placement = DEFAULT) -> Any:
    """llama_cpp's ``LlamaModel`` for ``key``: the weights, vocabulary and metadata alone, on the
    GPUs ``placement`` says (``place``)."""
    lib = llama_cpp_module()
    from llama_cpp import _internals

    _init_backend(lib)
    params = model_params(lib, key, placement)
    try:
        return _internals.LlamaModel(path_model=str(key.path), params=params, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"llama.cpp could not load {key.path.name} ({exc}); the file may be corrupt or "
            "incomplete: delete it (for a hub model, from the Hugging Face cache) and retry"
            + (f"; or the GPUs cannot hold it as placed ({placement.reason})" if placement.split_mode else "")
        ) from None


def _init_backend(lib: Any) -> None:
    global _backend_ready
    if not _backend_ready:
        from llama_cpp import _logger

        lib.llama_backend_init()
        _logger.set_verbose(False)  # llama.cpp's own log: errors only, as Llama(verbose=False)
        _backend_ready = True


_SPLIT_MODES = {"none": "LLAMA_SPLIT_MODE_NONE", "layer": "LLAMA_SPLIT_MODE_LAYER", "row": "LLAMA_SPLIT_MODE_ROW"}


def model_params(lib: Any, key: ModelKey, placement: Placement = DEFAULT) -> Any:
    """llama.cpp's model params for ``key`` and ``placement`` (split mode None: its defaults)."""
    params = lib.llama_model_default_params()
    params.n_gpu_layers = key.gpu_layers
    if not extra_buffers_run(lib, key.path):
        params.use_extra_bufts = False
    if placement.split_mode is None:
        return params
    params.split_mode = getattr(lib, _SPLIT_MODES[placement.split_mode])
    if placement.main_gpu is not None:
        params.main_gpu = placement.main_gpu
    if placement.tensor_split is not None:
        # llama.cpp reads llama_max_devices() floats. The pointer field keeps the array alive (ctypes
        # holds it in params._objects) for as long as params, which the LlamaModel keeps.
        if len(placement.tensor_split) > lib.LLAMA_MAX_DEVICES:
            raise InvalidRequest(f"'--tensor-split' has {len(placement.tensor_split)} entries, but llama.cpp takes "
                                 f"at most {lib.LLAMA_MAX_DEVICES} GPUs")
        params.tensor_split = (ctypes.c_float * lib.LLAMA_MAX_DEVICES)(*placement.tensor_split)
    return params


def extra_buffers_run(lib: Any, model: Path) -> bool:
    """Whether llama.cpp's extra weight buffers (AMX, repacked) may be used: not where this
    build's AMX kernels crash at a decode (cpu.py; probed once per build, with the embedded
    model where it is installed, else with ``model``)."""
    if not build_uses_amx(lib.llama_print_system_info().decode(errors="replace")):
        return True
    try:
        probe_model = embedded_model_path()
    except LLMMagicError:
        probe_model = model
    library = Path(lib.__file__).parent / "lib" / "libggml-cpu.so"
    if not extra_buffers_crash(library if library.exists() else Path(lib.__file__), probe_model):
        return True
    global _amx_warned
    if not _amx_warned:
        _amx_warned = True
        log.warning("this llama.cpp build's AMX kernels crash on this machine (llama.cpp issue 20824, a GCC 12 "
                    "miscompilation): weights load into plain CPU buffers. Reinstalling llama-cpp-python with "
                    "CMAKE_ARGS=\"%s\" builds it without AMX, and with llama.cpp's repacked weights",
                    NO_AMX_CMAKE_ARGS)
    return False


_amx_warned = False


def check_split(split: SplitFlags) -> None:
    """``placement.check`` against this machine: the GPUs llama.cpp sees (nvidia-smi, asked only
    when there are flags to check) and the most it takes (``LLAMA_MAX_DEVICES``)."""
    if not split.given:
        return
    from llm_magic.engine.llama_cpp.gpu import llama_gpus

    most = None
    if split.tensor_split is not None:
        try:
            most = int(llama_cpp_module().LLAMA_MAX_DEVICES)
        except (ModelLoadError, AttributeError):  # no llama-cpp-python: the load will say so
            pass
    check(split, llama_gpus(), most)


def place(key: ModelKey, settings: HostSettings) -> Placement:
    """Which GPUs ``key``'s model goes on (``placement.choose``): what the owner asked, else one
    GPU when it fits on the freest, else all of them. Asks nvidia-smi only when layers go to a GPU."""
    if key.gpu_layers == 0:  # the CPU (asked for, or a build without GPU offload)
        return unused_on_cpu(settings.split)
    from llm_magic.engine.llama_cpp.gpu import llama_gpus

    cells = key.ctx_length * (1 if settings.kv_unified else settings.parallel)  # a cache per slot
    return choose(settings.split, llama_gpus(),
                  lambda: model_needs(key.path, cells, settings.ubatch_size, key.gpu_layers))


def model_needs(path: Path, cells: int, ubatch: int, gpu_layers: int = -1) -> int | None:
    """Bytes ``path``'s model needs on GPUs with ``cells`` KV cache cells (``placement.estimate``),
    from its files' size and its metadata (read without its weights); with ``gpu_layers`` of
    them on GPUs, that share of its weights and cache. None when the metadata does not say."""
    lib = llama_cpp_module()
    from llama_cpp import _internals

    _init_backend(lib)
    params = lib.llama_model_default_params()
    params.vocab_only = True  # metadata and vocabulary only: a fraction of a second
    try:
        model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except (ValueError, RuntimeError, OSError):
        return None  # the real load says what is wrong
    try:
        metadata, n_vocab = model.metadata(), model.n_vocab()
    finally:
        model.close()
    per_cell = kv_bytes_per_cell(metadata)
    if per_cell is None:
        return None
    weights, kv = weights_bytes(path), per_cell * cells
    layers = int(metadata.get(f"{metadata.get('general.architecture')}.block_count") or 0) + 1  # and the output
    if 0 <= gpu_layers < layers:  # --gpu-layers N: N layers' share on GPUs, the rest on the CPU
        weights, kv = weights * gpu_layers // layers, kv * gpu_layers // layers
    return estimate(weights, kv, n_vocab, ubatch)


_SHARD = re.compile(r"^(?P<stem>.*)-\d{5}-of-(?P<count>\d{5})\.gguf$")


def weights_bytes(path: Path) -> int:
    """The size of a model's files: every shard of a split one (``x-00001-of-00003.gguf``)."""
    match = _SHARD.match(path.name)
    if not match:
        return path.stat().st_size
    count = int(match["count"])
    shards = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    return sum(p.stat().st_size for p in shards if p.exists())


def make_context(model: Any, key: ModelKey, settings: HostSettings) -> BatchContext:
    """A context with a KV cache per slot; if there is not memory for that, one cache the slots
    share (with a warning: an answer may then vary with what runs beside it)."""
    options = dict(n_ctx=key.ctx_length, n_seq=settings.parallel, threads=settings.threads,
                   flash_attention=settings.flash_attention, batch_size=settings.batch_size,
                   ubatch_size=settings.ubatch_size)
    try:
        return BatchContext(model.model, unified=settings.kv_unified, **options)
    except ModelLoadError:
        if settings.parallel == 1 or settings.kv_unified:
            raise
    context = BatchContext(model.model, unified=True, **options)
    log.warning("there is no memory for %d KV caches of %d tokens: the slots share one, and an "
                "answer may then differ slightly with what runs beside it (lower --parallel or "
                "--ctx to avoid this)", settings.parallel, key.ctx_length)
    return context


def offload_works() -> bool:
    """Whether layers can go to a GPU at all (a CPU-only build keeps them on the CPU whatever
    is asked, so asking changes nothing and must not reload)."""
    try:
        return bool(llama_cpp_module().llama_supports_gpu_offload())
    except (ModelLoadError, AttributeError):
        return False


def gpu_offload_supported() -> bool | None:
    """Whether the installed llama-cpp-python can offload layers to a GPU (built with CUDA,
    Metal, …); None when llama-cpp-python is not installed."""
    try:
        llama_cpp_module()
    except ModelLoadError:
        return None
    return offload_works()


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def device_info(model: Any, key: ModelKey, metadata: dict[str, str], context: BatchContext | None,
                placement: Placement = DEFAULT) -> dict[str, str]:
    """Where a loaded model runs, for ``/health``: ``device``, ``gpu_layers`` offloaded,
    ``memory`` (weights and KV cache as llama.cpp sizes them) and, when there was a choice to
    make or flags to follow, ``placement`` (which GPUs and why), worked out once at load."""
    from llm_magic.engine.llama_cpp.gpu import device_name

    lib = llama_cpp_module()
    weights, meta = model.model, metadata
    n_layer = lib.llama_model_n_layer(weights)
    layers = n_layer + 1  # as llama.cpp counts them ("offloaded 29/29 layers"): the output layer too
    offloaded = 0 if key.gpu_layers == 0 or not offload_works() else (
        layers if key.gpu_layers < 0 else min(key.gpu_layers, layers))
    arch = meta.get("general.architecture", "")
    n_head, n_head_kv = lib.llama_model_n_head(weights), lib.llama_model_n_head_kv(weights)
    head = lib.llama_model_n_embd(weights) // max(n_head, 1)
    k_dim = int(meta.get(f"{arch}.attention.key_length") or head)
    v_dim = int(meta.get(f"{arch}.attention.value_length") or head)
    cells = lib.llama_n_ctx(context.ctx) if context is not None else 0
    kv_bytes = cells * n_layer * n_head_kv * (k_dim + v_dim) * 2  # an f16 cache, llama.cpp's default
    slots = "no context" if context is None else (
        f"{context.n_seq} slot{'s' * (context.n_seq > 1)} of {context.n_ctx} tokens"
        if cells >= context.n_seq * context.n_ctx else f"{context.n_seq} slots sharing {cells} tokens")
    info = {"device": device_name(offloaded, placement.devices),
            "gpu_layers": f"{offloaded} of {layers}" if offloaded else "0 (CPU only)",
            "memory": f"{_mib(lib.llama_model_size(weights))} model + {_mib(kv_bytes)} KV cache ({slots})"}
    return {**info, "placement": placement.reason} if placement.reason else info


def chat_formats() -> list[str]:
    """Names accepted as ``chat_format`` besides the GGUF's own template (the default)."""
    from llama_cpp import llama_chat_format

    registry = llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers
    return sorted(name for name, handler in registry.items() if _formatter_of(handler) is not None)


def _formatter_of(handler: Any) -> Any:
    # llama-cpp-python registers named prompt formats only as completion handlers that close
    # over their formatter; we need the formatter alone, to run generation through our loop.
    code = getattr(handler, "__code__", None)
    if code is None or "chat_formatter" not in code.co_freevars:
        return None
    return handler.__closure__[code.co_freevars.index("chat_formatter")].cell_contents


def make_formatter(model: Any, metadata: dict[str, str], chat_format: str | None,
                   template: str | None = None) -> Any:
    """What turns messages into this model's prompt: ``template`` if given, else its GGUF
    template (``chat_format`` None), else the named format; chatml for a model that has none."""
    from llama_cpp import llama_chat_format

    template = template or metadata.get("tokenizer.chat_template")
    if chat_format is None and template:
        eos, bos = model.token_eos(), model.token_bos()
        text = model.token_get_text
        return llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=text(eos) if eos != -1 else "",
            bos_token=text(bos) if bos != -1 else "")
    if chat_format is None:
        log.warning("the model has no chat template; using chatml")
        chat_format = "chatml"
    try:
        handler = llama_chat_format.get_chat_completion_handler(chat_format)
    except Exception:  # llama-cpp-python raises its own not-found exception type
        handler = None
    formatter = _formatter_of(handler) if handler is not None else None
    if formatter is None:
        raise InvalidRequest(
            f"unknown chat_format '{chat_format}'; leave it out to use the model's own template, "
            f"or use one of: {', '.join(chat_formats())}")
    return formatter
