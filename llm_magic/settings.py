"""Every ``serve`` setting and its default, in one place.

``llm-magic serve``, ``ApiHost``, ``%llm_host start`` and the backends all read a
``ServeSettings``: the command line is built from its fields (``add_serve_arguments``), parsed
back into one (``from_args``), and written out again for a child process (``to_argv``).
Standard library only, so that every tier may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

TOKEN_ENV = "LLM_MAGIC_TOKEN"
TUNNELS = ("cloudflared", "none")
FLASH_ATTENTION = ("auto", "on", "off")
SPEC_KINDS = ("ngram", "none")
REASONING_FORMATS = ("auto", "none", "deepseek")  # as llama-server's --reasoning-format
SPLIT_MODES = ("none", "layer", "row")  # as llama-server's --split-mode
LLAMA_PARALLEL = 4  # slots, as llama-server's default
FRONTED_PARALLEL = 64  # requests in flight to an engine that batches itself (vLLM's scheduler)


@dataclass
class ServeSettings:
    """What a host serves and how; each field is the ``serve`` flag of the same name."""

    model: str | None = None
    engine: str | None = None  # None: llama.cpp here; a URL: the engine to front; vllm | llama-server: start it
    engine_key: str | None = None
    tensor_parallel_size: int | None = None  # --engine vllm: GPUs per model replica
    pipeline_parallel_size: int | None = None  # --engine vllm: pipeline stages (nodes, through Ray)
    max_model_len: int | None = None  # --engine vllm (default: --ctx)
    gpu_memory_utilization: float | None = None  # --engine vllm
    vllm_arg: list[str] = field(default_factory=list)  # --engine vllm: any further `vllm serve` argument
    llama_server_arg: list[str] = field(default_factory=list)  # --engine llama-server: e.g. -sm row, -ts 3,1, --rpc
    engine_start_timeout: float = 900.0  # a started engine's time to answer /health (vLLM loads and compiles)
    host: str = "127.0.0.1"
    port: int = 5000
    token: str | None = None
    no_token: bool = False
    tunnel: str | None = None  # None: cloudflared in a notebook, none on the terminal
    ctx: int = 4096
    max_ctx: int | None = None
    gpu_layers: int = -1
    split_mode: str | None = None  # none | layer | row; None: one GPU when the model fits, else layers over all
    tensor_split: tuple[float, ...] | None = None  # proportions per GPU, as llama-server's -ts 3,1
    main_gpu: int | None = None  # the GPU of split mode none (row: of small tensors); None: the freest
    threads: int | None = None
    chat_format: str | None = None
    chat_template_file: str | None = None  # a Jinja chat template used instead of the GGUF's
    reasoning_format: str = "auto"  # thinking models: auto | none | deepseek, as llama-server spells it
    reasoning_budget: int = -1  # the most reasoning tokens per answer; -1 unlimited
    allow_model: list[str] = field(default_factory=list)
    parallel: int | None = None  # None: 4 for llama.cpp (as llama-server's), 64 in front of an engine
    max_queue: int = 16
    spec: str = "ngram"  # speculation: ngram (drafts from the answer's own history) | none
    spec_draft_max: int = 16  # the most tokens drafted per step
    spec_draft_min: int = 2  # shorter drafts are not tried
    model_draft: str | None = None  # a small GGUF of the same vocabulary that drafts instead of n-grams
    batch_size: int = 2048  # prompt tokens one decode step takes at most, as llama-server's -b
    ubatch_size: int = 512  # of those, how many llama.cpp computes at once, as llama-server's -ub
    flash_attn: str = "auto"  # as llama-server's default
    embedding_model: str | None = None
    cors: list[str] = field(default_factory=list)
    keepalive: float = 15.0  # well inside Cloudflare's 100 s idle limit
    log_prompts: bool = False  # the access log shows each request's prompt (off: never any prompt text)

    @property
    def slots(self) -> int:
        """``parallel``, or its default for the engine."""
        batches_itself = self.engine is not None and self.engine != "llama-server"  # a URL, or vLLM
        return self.parallel or (FRONTED_PARALLEL if batches_itself else LLAMA_PARALLEL)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServeSettings":
        """The settings an ``add_serve_arguments`` parser read (other attributes are ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def replace(self, **changes: Any) -> "ServeSettings":
        return dataclasses.replace(self, **changes)

    def to_argv(self, skip: Sequence[str] = ()) -> list[str]:
        """The ``serve`` flags that give these settings: only those that differ from the
        defaults, in the order the flags are listed; ``skip`` names fields left out."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), _default(f)
            if f.name in skip or value == default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag)
            elif isinstance(value, list):
                for item in value:
                    argv += [flag, str(item)]
            elif isinstance(value, tuple):  # --tensor-split 3,1
                argv += [flag, ",".join(_number(x) for x in value)]
            elif value is not None:
                argv += [flag, str(value)]
        return argv


DEFAULTS = ServeSettings()


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {least} or more, not {value}")
    return value


def _at_least_zero(text: str) -> int:
    return _whole(text, 0)


def _proportions(text: str) -> tuple[float, ...]:
    """``3,1``: a share of the model per GPU, as llama.cpp's ``-ts`` (only the ratios matter)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of numbers, one per GPU, such as 3,1") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}': each proportion must be a number of 0 or more")
    if not any(values):
        raise argparse.ArgumentTypeError(f"'{text}': at least one proportion must be above 0")
    return values


def _at_least_one(text: str) -> int:
    return _whole(text, 1)


def _budget(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (unlimited) or more, not {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (shared with ``%llm_host start``), their defaults from ``ServeSettings``."""
    d = DEFAULTS
    parser.add_argument("--model", metavar="SPEC",
                        help="a .gguf path, OWNER/REPO:QUANT, OWNER/REPO:FILENAME (glob allowed); "
                             "default: the embedded SmolLM2-135M-Instruct. With --engine: the engine's "
                             "model to serve (default: the first it lists)")
    parser.add_argument("--engine", metavar="URL", default=d.engine,
                        help="front a running OpenAI-compatible engine (vLLM, SGLang, llama-server, Ollama, "
                             "TGI, LM Studio, another llm_magic) at URL instead of running llama.cpp here")
    parser.add_argument("--engine-key", metavar="KEY", default=d.engine_key,
                        help="the API key the engine at --engine wants (sent as a Bearer token; never shown)")
    engine = parser.add_argument_group("an engine this host starts (--engine vllm | llama-server)")
    engine.add_argument("--tensor-parallel-size", type=_at_least_one, default=d.tensor_parallel_size, metavar="N",
                        help="vLLM: split the model over N GPUs")
    engine.add_argument("--pipeline-parallel-size", type=_at_least_one, default=d.pipeline_parallel_size,
                        metavar="N", help="vLLM: N pipeline stages (several nodes: see the README's Ray recipe)")
    engine.add_argument("--max-model-len", type=_at_least_one, default=d.max_model_len, metavar="N",
                        help="vLLM: the context length (default: --ctx)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization, metavar="F",
                        help="vLLM: the share of each GPU's memory it may take (vLLM's default: 0.9)")
    engine.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                        help="one more `vllm serve` argument (repeatable; write --vllm-arg=--flag for a flag)")
    engine.add_argument("--llama-server-arg", action="append", default=[], metavar="ARG",
                        help="one more llama-server argument (repeatable), e.g. --llama-server-arg=-sm "
                             "--llama-server-arg=row")
    engine.add_argument("--engine-start-timeout", type=float, default=d.engine_start_timeout, metavar="S",
                        help="seconds a started engine may take to answer /health (default: %(default)s)")
    parser.add_argument("--host", default=d.host, help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=d.port,
                        help="port to bind; 0 picks a free one (default: %(default)s)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", metavar="T", help=f"access token (default: ${TOKEN_ENV}, else a new random one)")
    auth.add_argument("--no-token", action="store_true", help="serve without a token (only the default model)")
    parser.add_argument("--tunnel", choices=TUNNELS, default=d.tunnel,
                        help="public tunnel (default: none on the terminal)")
    parser.add_argument("--ctx", type=int, default=d.ctx, metavar="N",
                        help="context length in tokens (default: %(default)s)")
    parser.add_argument("--max-ctx", type=int, default=d.max_ctx, metavar="N",
                        help="the largest context a token holder's request may ask for with /api's "
                             "options.ctx_length, reloading the model (default: --ctx, no reloads)")
    parser.add_argument("--gpu-layers", type=int, default=d.gpu_layers, metavar="N",
                        help="layers to offload to the GPU; -1 all, 0 CPU only (default: %(default)s)")
    gpus = parser.add_argument_group("several GPUs (llama.cpp here)")
    gpus.add_argument("--split-mode", choices=SPLIT_MODES, default=d.split_mode,
                      help="none: the whole model on one GPU (--main-gpu); layer: layers spread over the GPUs; "
                           "row: each layer's rows spread too (default: one GPU when the model fits on the one "
                           "with the most free memory, layers over all of them when it does not)")
    gpus.add_argument("--tensor-split", type=_proportions, default=d.tensor_split, metavar="A,B,...",
                      help="the share of the model per GPU, as llama.cpp's -ts (3,1: three quarters on GPU 0); "
                           "default: by free memory")
    gpus.add_argument("--main-gpu", type=_at_least_zero, default=d.main_gpu, metavar="N",
                      help="the GPU for the whole model with --split-mode none (row: for small tensors and "
                           "intermediate results); default: the one with the most free memory")
    parser.add_argument("--threads", type=int, default=d.threads, metavar="N", help="CPU threads (default: every core)")
    parser.add_argument("--chat-format", default=d.chat_format, metavar="NAME",
                        help="chat template name (default: the template inside the GGUF)")
    parser.add_argument("--chat-template-file", default=d.chat_template_file, metavar="PATH",
                        help="a Jinja chat template to use instead of the one inside the GGUF (one that is "
                             "wrong or missing)")
    parser.add_argument("--reasoning-format", choices=REASONING_FORMATS, default=d.reasoning_format,
                        help="thinking models: auto reads <think> blocks or gpt-oss channels as the chat "
                             "template says; deepseek reads <think> blocks whatever it says; none leaves the "
                             "reasoning in the content (default: %(default)s)")
    parser.add_argument("--reasoning-budget", type=_budget, default=d.reasoning_budget, metavar="N",
                        help="the most tokens an answer may think; past them the host closes the block "
                             "and the answer follows; 0 no thinking, -1 unlimited (default: %(default)s)")
    parser.add_argument("--allow-model", action="append", default=[], metavar="PATTERN",
                        help="let requests load models matching PATTERN (repeatable), e.g. 'bartowski/*'")
    parser.add_argument("--parallel", type=_at_least_one, default=d.parallel, metavar="N",
                        help="answers written at once, decoded together in one batch; each slot keeps "
                             "its own KV cache of --ctx tokens, so memory for the cache grows with N "
                             f"(default: {LLAMA_PARALLEL}, as llama-server's; {FRONTED_PARALLEL} in front of an "
                             "--engine, which batches itself; 1 serves one request at a time)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                        help="requests that may wait for a free slot before 503 (default: %(default)s)")
    parser.add_argument("--spec", choices=SPEC_KINDS, default=d.spec,
                        help="speculative decoding: ngram guesses an answer's next tokens from the prompt "
                             "and the answer so far (edits, code, quotes come out several tokens a step, "
                             "token for token the same answer); none decodes one token a step "
                             "(default: %(default)s)")
    parser.add_argument("--spec-draft-max", type=_at_least_one, default=d.spec_draft_max, metavar="N",
                        help="the most tokens guessed ahead per step (default: %(default)s)")
    parser.add_argument("--spec-draft-min", type=_at_least_one, default=d.spec_draft_min, metavar="N",
                        help="guesses shorter than this are not tried (default: %(default)s)")
    parser.add_argument("--model-draft", metavar="SPEC", default=d.model_draft,
                        help="a small model of the same family (same tokenizer) that guesses the next "
                             "tokens instead of n-grams, as REPO:QUANT or a local .gguf: its own KV caches; "
                             "worth it on a GPU, where checking guesses costs about one step")
    parser.add_argument("--batch-size", type=_at_least_one, default=d.batch_size, metavar="N",
                        help="the most prompt tokens read in one step while nothing else is written "
                             "(default: %(default)s, as llama-server's)")
    parser.add_argument("--ubatch-size", type=_at_least_one, default=d.ubatch_size, metavar="N",
                        help="tokens llama.cpp computes at once; beside answers being written a prompt "
                             "is read at most this many per step (default: %(default)s, as llama-server's)")
    parser.add_argument("--flash-attn", choices=FLASH_ATTENTION, default=d.flash_attn,
                        help="llama.cpp's flash attention: faster, and llama-server's default "
                             "(default: %(default)s; 'off' gives llama-cpp-python's default numerics)")
    parser.add_argument("--embedding-model", metavar="SPEC", default=d.embedding_model,
                        help="a model for /v1/embeddings (default: the served model, in an embedding "
                             "context sharing its weights)")
    parser.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                        help="let browser pages from ORIGIN call the host (repeatable; '*' for any); "
                             "default: none")
    parser.add_argument("--keepalive", type=float, default=d.keepalive, metavar="S",
                        help="while the model is busy, send a keep-alive every S seconds so that "
                             "proxies and tunnels do not cut the answer (default: %(default)s)")
    parser.add_argument("--log-prompts", action="store_true", default=d.log_prompts,
                        help="write each request's prompt (its start) into the access log; by default "
                             "no prompt text is ever logged")
