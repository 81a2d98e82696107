"""What a loaded model's vocabulary tells a request, worked out once per token and kept while
the model stays loaded: each token's bytes, whether it ends a generation (both asked for every
token written), the longest piece, the tokens holding control characters, and which exact
schema texts it can write."""

from __future__ import annotations

import ctypes
import json
from typing import Any

from llm_magic.engine.llama_cpp.loading import llama_cpp_module
from llm_magic.errors import InvalidRequest

WRITABLE_MEMORY = 4096  # schema texts remembered as writable, per model (then forgotten, all at once)


class Vocabulary:
    """The vocabulary of ``model`` (llama_cpp's LlamaModel), named ``name`` in errors."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}  # with control tokens' text (harmony's markers)
        self._ends: dict[int, bool] = {}  # token -> whether it ends a generation
        self._longest_piece: int | None = None
        self._control_tokens: tuple[int, ...] | None = None
        self._writable: set[str] = set()

    def piece(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token (cached: the vocabulary is fixed); ``special``: a control
        token's text too, else it has none."""
        pieces = self._special_pieces if special else self._pieces
        piece = pieces.get(token)
        if piece is None:
            lib = llama_cpp_module()
            vocab = self.model.vocab
            buf = ctypes.create_string_buffer(64)
            n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
            piece = pieces[token] = buf.raw[:n]
        return piece

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (cached, as pieces are: asked once per token written)."""
        end = self._ends.get(token)
        if end is None:
            end = self._ends[token] = bool(llama_cpp_module().llama_vocab_is_eog(self.model.vocab, token))
        return end

    def special_piece(self, token: int) -> bytes:
        return self.piece(token, True)

    @property
    def n_vocab(self) -> int:
        return llama_cpp_module().llama_vocab_n_tokens(self.model.vocab)

    def longest_piece(self) -> int:
        """The most bytes one token stands for: a text that long times the context cannot fit."""
        if self._longest_piece is None:
            self._longest_piece = max(len(self.piece(t)) for t in range(self.n_vocab))
        return max(1, self._longest_piece)

    def control_tokens(self) -> tuple[int, ...]:
        """The tokens whose text holds a control character (a raw newline, a tab): JSON grammars
        never allow one, so a constrained answer bans them up front (looked up once)."""
        if self._control_tokens is None:
            self._control_tokens = tuple(t for t in range(self.n_vocab)
                                         if any(b < 0x20 or b == 0x7F for b in self.piece(t)))
        return self._control_tokens

    def check_writable(self, texts: frozenset[str]) -> None:
        """Refuse a constraint whose exact texts (keys, constants) this vocabulary cannot write:
        the answer would reach them and find no token to go on with. A text found writable is
        remembered, so that a schema sent with every request is tokenised once."""
        for text in texts:
            if text in self._writable:
                continue
            data = text.encode("utf-8")
            tokens = self.model.tokenize(data, add_bos=False, special=False)
            if b"".join(self.piece(t) for t in tokens) != data:
                raise InvalidRequest(f"the schema asks for {json.dumps(text, ensure_ascii=False)[:80]}, which "
                                     f"{self.name}'s vocabulary cannot write (it lacks some of its bytes); "
                                     "use other characters there")
            if len(self._writable) >= WRITABLE_MEMORY:
                self._writable.clear()
            self._writable.add(text)
