"""The resident model, and everything about it a request needs.

``LoadedModel`` holds the weights, the batch context and what is worked out from them once
(its ``Vocabulary``, chat formatters). ``prepare`` turns a request into the scheduler's
``Task``: the prompt (chat template, tool format), its constraint and a sampler per choice. It
knows nothing of the line requests wait in, nor of other models: the backend above decides which
model serves a request and hands the request down.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
from typing import Any, Sequence

from llm_magic.engine.llama_cpp.batching import BatchContext, Task
from llm_magic.engine.llama_cpp.decoding import Choice
from llm_magic.engine.llama_cpp.grammar.check import GrammarChecker
from llm_magic.engine.llama_cpp.grammar.constraints import Constraint, grammar_for, tool_grammar
from llm_magic.engine.llama_cpp.loading import HostSettings, ModelKey, llama_cpp_module, make_formatter
from llm_magic.engine.llama_cpp.sampling import Logprobs, TokenSampler
from llm_magic.engine.llama_cpp.thinking import ThinkingSampler
from llm_magic.engine.llama_cpp.vocabulary import Vocabulary
from llm_magic.errors import ContextLengthExceeded, InvalidRequest
from llm_magic.wire.reasoning import ReasoningFormat, detect_reasoning
from llm_magic.wire.tool_calls import FORMATS, ToolFormat, detect_format, generic_messages
from llm_magic.wire.types import GenerationRequest

EMBEDDING_CTX = 4096  # the longest input an embedding takes (also bounded by --ctx and the model)
EMBEDDING_TOKENS = 8 * EMBEDDING_CTX  # the most one embedding request computes


class LoadedModel:
    """A model in memory: its weights, its context for generating (None for an embedding
    model) and what requests learn about its vocabulary, kept while it stays loaded."""

    def __init__(self, key: ModelKey, name: str, model: Any, settings: HostSettings,
                 context: BatchContext | None = None, grammars: GrammarChecker | None = None) -> None:
        self.key = key
        self.name = name
        self.model = model  # llama_cpp's LlamaModel: weights, vocabulary, metadata
        self.context = context
        self.settings = settings
        self.grammars = grammars  # the host's: grammars are compiled in a child process first
        self.metadata: dict[str, str] = model.metadata()
        self.embedder: Any = None  # an EmbeddingContext on these weights, made at its first use
        self.vocabulary = Vocabulary(model, name)  # its token pieces and what they can write
        self._formatters: dict[str | None, Any] = {}

    def close(self) -> None:
        """Free the contexts, then the weights they use."""
        for part in (self.embedder, self.context, self.model):
            if part is not None:
                part.close()

    # -- prompts -------------------------------------------------------------------------

    def formatter(self, chat_format: str | None) -> Any:
        """The chat formatter for ``chat_format`` (None: the GGUF's template), made once."""
        if chat_format not in self._formatters:
            self._formatters[chat_format] = make_formatter(
                self.model, self.metadata, chat_format, self.settings.chat_template if chat_format is None else None)
        return self._formatters[chat_format]

    @property
    def template(self) -> str | None:
        """The chat template prompts are made with: the host's --chat-template-file, else the GGUF's."""
        return self.settings.chat_template or self.metadata.get("tokenizer.chat_template")

    def tool_format(self, request: GenerationRequest) -> ToolFormat | None:
        """How this model writes tool calls, when the request involves tools (offers them, or
        its history holds calls and results); the template's own format, else ``generic``."""
        involved = request.tools is not None or any(
            m.get("tool_calls") or m["role"] == "tool" for m in request.messages or ())
        if not involved:
            return None
        if request.chat_format or self.settings.chat_format:  # a named format, not the GGUF's template
            return FORMATS["generic"]
        return detect_format(self.template)

    def prompt_tokens(self, request: GenerationRequest, n_ctx: int,
                      tool_format: ToolFormat | None) -> tuple[list[int], tuple[str, ...], str]:
        """The request's prompt as tokens, the stop sequences (the request's and the
        template's), and the prompt's text."""
        stops = request.sampling.stop
        if not request.is_chat:
            text, add_bos = request.prompt or "", True
        else:
            formatter = self.formatter(request.chat_format or self.settings.chat_format)
            messages = [dict(m) for m in request.messages or ()]
            extra: dict = template_kwargs(request)
            if tool_format is not None and not tool_format.native:
                messages = generic_messages(request.messages or (), request.tools)
            elif request.tools is not None:
                extra["tools"] = [t.as_openai() for t in request.tools.tools]
            try:
                result = formatter(messages=messages, **extra)
            except Exception as exc:  # jinja2 errors and the template's raise_exception()
                raise InvalidRequest(f"the model's chat template rejected these messages: {exc}") from None
            extra = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
            text, add_bos = result.prompt, not result.added_special
            stops = tuple(dict.fromkeys([*stops, *extra]))
        data = text.encode("utf-8")
        # Tokenising megabytes takes seconds: refuse at once what cannot fit, by the fewest
        # tokens that many bytes can make.
        if len(data) > n_ctx and len(data) > n_ctx * self.vocabulary.longest_piece():
            raise prompt_too_long(f"at least {len(data) // self.vocabulary.longest_piece()}", n_ctx)
        return self.model.tokenize(data, add_bos=add_bos, special=True), stops, text

    # -- requests ------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, cancel: threading.Event,
                first_text_passed: threading.Event | None = None) -> Task:
        """The request as the scheduler takes it: its prompt's tokens and a sampler per choice.
        Every refusal (prompt too long, a schema the vocabulary cannot write) comes from here,
        before anything is queued."""
        lib = llama_cpp_module()
        model = self.model
        assert self.context is not None
        n_ctx = self.context.n_ctx
        harmony = reasoning_for(self.template, self.settings, request, "")
        tool_format = None if harmony and harmony.name == "harmony" else self.tool_format(request)  # gpt-oss's own
        tokens, stops, prompt = self.prompt_tokens(request, n_ctx, tool_format)
        reasoning = reasoning_for(self.template, self.settings, request, prompt)
        if request.tools is None:  # a history with tool calls, but none offered now: plain text
            tool_format = None
        if not tokens:  # an empty prompt: generate from the start-of-text token, as llama.cpp does
            if model.token_bos() == -1:
                raise InvalidRequest("the prompt is empty and this model has no start token: send some text")
            tokens = [model.token_bos()]
        if len(tokens) >= n_ctx:
            raise prompt_too_long(str(len(tokens)), n_ctx)
        budget = n_ctx - len(tokens)
        s = request.sampling
        max_tokens = min(s.max_tokens or budget, budget)
        seed = random.getrandbits(32) if s.seed is None or s.seed < 0 else s.seed % 2**32
        constraint = constraint_for(request, tool_format)
        grammar, banned = None, ()
        if constraint is not None:
            banned = () if constraint.controls else self.vocabulary.control_tokens()
            self.vocabulary.check_writable(constraint.texts)
            grammar = constraint.grammar
            if self.grammars is not None:  # compiled in a child first: a bad one cannot take the host down
                self.grammars.check(grammar)
        vocab, n_vocab = model.vocab, lib.llama_vocab_n_tokens(model.vocab)
        vocabulary = self.vocabulary
        special = reasoning is not None and reasoning.special_tokens
        piece = vocabulary.special_piece if special else vocabulary.piece
        budget = request.reasoning_budget if request.reasoning_budget is not None else self.settings.reasoning_budget

        def sampler(seed: int) -> TokenSampler:
            if reasoning is None:
                return TokenSampler(vocab, s, seed, grammar, banned)
            return ThinkingSampler(vocab, s, seed, grammar, fmt=reasoning, budget=budget, piece=piece,
                                   tokenize=lambda text: model.tokenize(text.encode(), add_bos=False, special=True))
        events: queue.SimpleQueue = queue.SimpleQueue()

        choices = []
        try:
            for i in range(request.n):  # each answer draws its own samples: seed, seed + 1, ...
                choices.append(Choice(
                    i, sampler((seed + i) % 2**32), max_tokens=max_tokens,
                    stops=stops, piece=piece, is_end=self.vocabulary.is_end, emit=events.put,
                    logprobs=Logprobs(request.logprobs, n_vocab, piece) if request.logprobs is not None else None))
        except BaseException:
            for choice in choices:
                choice.close()
            raise
        name = self.name

        def finish(task: Task) -> None:
            answers = [c.completion(name, len(tokens), task.cached, task.started) for c in task.choices]
            if len(answers) > 1:  # one event: the first answer, with them all and their usage summed
                answers[0] = dataclasses.replace(
                    answers[0], completion_tokens=sum(a.completion_tokens for a in answers),
                reasoning_tokens=sum(a.reasoning_tokens for a in answers), choices=tuple(answers))
            events.put(answers[0])

        return Task(tokens, choices, finish, cancel, events=events, first_text_passed=first_text_passed,
                    tool_format=tool_format.name if tool_format else None, reasoning=reasoning,
                    speculative=request.speculative)

    # -- embeddings ----------------------------------------------------------------------

    def make_embedder(self) -> Any:
        """The model's embedding context, made at its first use (in the compute thread)."""
        from llm_magic.engine.llama_cpp.embeddings import EmbeddingContext

        if self.embedder is None:
            host_ctx = self.settings.ctx_length
            n_ctx = min(host_ctx, self.model.n_ctx_train() or host_ctx, EMBEDDING_CTX)
            self.embedder = EmbeddingContext(self.model.model, n_ctx, self.settings.threads)
        return self.embedder

    def embedding_tokens(self, inputs: Sequence[str | Sequence[int]], n_ctx: int) -> list[list[int]]:
        """Every input as tokens, checked whole before any is computed: in the vocabulary, within
        the embedding context, and all of them within ``EMBEDDING_TOKENS``."""
        n_vocab = self.vocabulary.n_vocab
        sequences, total = [], 0
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if len(item.encode("utf-8")) > n_ctx * self.vocabulary.longest_piece():
                    raise ContextLengthExceeded(f"'input[{i}]' is longer than the embedding context ({n_ctx} tokens)")
                tokens = self.model.tokenize(item.encode("utf-8"), add_bos=True, special=False)
            else:
                tokens = list(item)
                bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
                if bad is not None:
                    raise InvalidRequest(f"'input[{i}]' holds token {bad}, which is not in the model's "
                                         f"vocabulary (0 to {n_vocab - 1})")
            if not tokens:
                raise InvalidRequest(f"'input[{i}]' is empty: send some text")
            if len(tokens) > n_ctx:
                raise ContextLengthExceeded(f"'input[{i}]' is {len(tokens)} tokens but the embedding context "
                                            f"holds {n_ctx}")
            total += len(tokens)
            if total > EMBEDDING_TOKENS:
                raise InvalidRequest(f"the inputs are more than {EMBEDDING_TOKENS} tokens together (at 'input[{i}]'); "
                                     "send them in several requests")
            sequences.append(tokens)
        return sequences


TEMPLATE_NAMES = ("messages", "tools", "functions", "function_call", "tool_choice", "eos_token", "bos_token",
                  "raise_exception", "add_generation_prompt", "strftime_now")  # the formatter sets these


def reasoning_for(template: str | None, settings: HostSettings, request: GenerationRequest,
                  prompt: str) -> ReasoningFormat | None:
    """How a chat answer to ``prompt`` may think (None: it is content only)."""
    if not request.is_chat:
        return None
    setting = request.reasoning_format or settings.reasoning_format
    named = request.chat_format or settings.chat_format  # a named format, not the template
    return detect_reasoning(None if named else template, setting, prompt)


def template_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """The request's own variables for the chat template (``chat_template_kwargs``, and
    ``reasoning_effort`` for templates that read it, as gpt-oss's)."""
    kwargs = {k: v for k, v in (request.chat_template_kwargs or {}).items() if k not in TEMPLATE_NAMES}
    if request.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", request.reasoning_effort)
    return kwargs


def constraint_for(request: GenerationRequest, tool_format: ToolFormat | None) -> Constraint | None:
    """The llama.cpp grammar for a request's ``response_format`` or tool calls, if any."""
    if request.response_format is not None:
        return grammar_for(request.response_format)
    if request.tools is not None and tool_format is not None:
        return tool_grammar(request.tools, tool_format)
    return None


def prompt_too_long(tokens: str, n_ctx: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(f"the prompt is {tokens} tokens but the model's context holds {n_ctx}: shorten "
                                 "it (the context is set by the host's owner with --ctx)")
