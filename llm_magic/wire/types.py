"""The request types every wire format parses into and every backend takes. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_magic.wire.tool_calls import ToolRequest

MAX_TOKENS_LIMIT = 1 << 20  # far beyond any context; the engine clamps to the real one
SEED_LIMIT = 2**64


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, with the defaults llama.cpp's own server uses."""

    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # OpenAI's logit_bias: (token id, bias) pairs added to the logits before any other stage;
    # -100 bans the token. Ids are checked against the vocabulary when the sampler is made.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, whatever wire format it came in."""

    prompt: str | None = None  # text completion
    messages: tuple[dict, ...] | None = None  # chat: ({"role", "content"}, ...)
    model: str | None = None  # a model spec (models.py); None: the host's default model
    sampling: Sampling = field(default_factory=Sampling)
    ctx_length: int | None = None  # None: the host's setting
    use_gpu: bool | None = None  # None: the host's setting
    chat_format: str | None = None  # None: the template inside the GGUF
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    response_format: "ResponseFormat | None" = None  # constrain the output to JSON
    logprobs: int | None = None  # how many alternatives per token to report; None: no logprobs
    tools: ToolRequest | None = None  # tools the model may call (OpenAI's tools, tool_choice)
    n: int = 1  # answers to write to the one prompt (OpenAI's n)
    # /v1/completions with a list of prompts: all of them (``prompt`` is the first). The engine
    # writes one prompt per request; the server runs one generation per prompt and merges them.
    prompts: tuple[str, ...] = ()
    request_id: str | None = None  # the server's id for it (X-Request-Id): /slots, an engine's log
    # Thinking models (wire/reasoning.py): None for each means the host's setting.
    reasoning_format: str | None = None  # auto | none | deepseek, as llama-server spells them
    reasoning_budget: int | None = None  # the most reasoning tokens; -1 unlimited
    reasoning_effort: str | None = None  # low | medium | high, for templates that take it (gpt-oss)
    chat_template_kwargs: dict | None = None  # more variables for the chat template (enable_thinking)
    speculative: bool = True  # False: no tokens drafted ahead for this answer (the host's --spec otherwise)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON valid against ``schema``."""

    schema: dict | None = None  # None: any JSON object
    name: str = "response"
    strict: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives."""

    token: str
    logprob: float
    bytes: bytes
    top: tuple[tuple[str, float, bytes], ...] = ()


