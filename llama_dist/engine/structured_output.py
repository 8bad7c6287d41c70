"""Structured output: the tokens of a request follow a grammar (a JSON schema, any JSON object, a regex, one of a
few strings, a Lark grammar), through llguidance.

llguidance (Microsoft's, the library behind vLLM's "guidance" backend and llama.cpp's grammars) over xgrammar:
it works from any vocabulary given as token bytes, so the three tokenizer kinds here (tiktoken, Hugging Face
tokenizer.json, SentencePiece with byte fallback) all fit; it computes a step's mask in well under a millisecond
without compiling the grammar ahead; and it has no torch dependency to fight the pinned one.

Rank 0 alone applies grammars: the sampler masks the tokens a request's grammar does not allow (the vocabulary's
padded tail included), the other ranks never know. `GrammarCompiler` builds the grammar vocabulary once (about a
second for 128k tokens) and checks each grammar before the request reaches the engine (the HTTP side calls
`check` off the engine loop), caching checked grammars; the engine then gives each request its own `Guide`.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass

import numpy as np
import torch

from llama_dist.errors import RequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# JSON as json.dumps writes it ({"a": 1, "b": [2, 3]}): any whitespace would let a model pad its output with blanks
# until max_tokens (a known way for constrained decoding to fail), and this is the spelling most text shows.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match. spec: the JSON schema as JSON text (json_schema), the regex, the
    choices as a JSON list (choice), the Lark text (lark); unused for json_object."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RequestError(f"a grammar is one of {', '.join(KINDS)}, got {self.kind!r}")

    def source(self) -> str:
        """The grammar in llguidance's form."""
        from llguidance import LLMatcher

        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_LAYOUT)
        if self.kind == "json_schema":
            try:
                return LLMatcher.grammar_from_json_schema(self.spec, overrides=JSON_LAYOUT)
            except ValueError as e:
                raise RequestError(f"the JSON schema is not valid: {e}") from None
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            choices = json.loads(self.spec)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise RequestError("guided_choice must be a list of non-empty strings")
            # Lark string literals take JSON's escapes: each choice matches exactly its text.
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        return LLMatcher.grammar_from_lark(self.spec)


class Guide:
    """One request's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar allows next (ids past the grammar's vocabulary never)."""
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[: self.vocab_size].astype(bool)
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed[: bits.shape[0]] = torch.from_numpy(bits)
        return allowed

    def consume(self, token: int) -> None:
        """Take the sampled token (RequestError if the grammar cannot: the mask allowed it, so never expected)."""
        if not self._matcher.consume_token(token) or self._matcher.is_error():
            raise RequestError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing more may follow: the output is complete."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """The grammar vocabulary of one tokenizer and model (built on first use), checked grammars, new Guides."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._ll_tokenizer = None

    @property
    def ll_tokenizer(self):
        with self._lock:  # built once, by whichever thread comes first (the HTTP side's check, normally)
            if self._ll_tokenizer is None:
                self._ll_tokenizer = grammar_vocabulary(self.tokenizer, self.vocab_size)
            return self._ll_tokenizer

    def check(self, grammar: Grammar) -> None:
        """RequestError naming the problem when the grammar cannot be used; cached per grammar."""
        error = self._validate(grammar)
        if error:
            raise RequestError(f"the {grammar.kind} grammar is not usable: {error}")

    @functools.lru_cache(maxsize=256)
    def _validate(self, grammar: Grammar) -> str:
        from llguidance import LLMatcher

        try:
            source = grammar.source()
        except RequestError as e:
            return str(e)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(source, self.ll_tokenizer)
        return messages[0] if is_error else ""

    def guide(self, grammar: Grammar) -> Guide:
        from llguidance import LLMatcher

        self.check(grammar)
        return Guide(LLMatcher(self.ll_tokenizer, grammar.source(), log_level=0), self.vocab_size)


def grammar_vocabulary(tokenizer, vocab_size: int):
    """llguidance's LLTokenizer for one of the tokenizer kinds, over the model's vocab_size ids (a padded tail
    is never allowed); the tokenizer's stop tokens end a grammar's output."""
    from llguidance import LLTokenizer
    from llguidance.tiktoken import lltokenizer_from_encoding

    from llama_dist.text.tokenizer import SentencePieceWrapper, TiktokenWrapper
    from llama_dist.text.tokenizer_hf import HuggingFaceTokenizer

    stops = list(tokenizer.stop_tokens)
    if isinstance(tokenizer, TiktokenWrapper):
        return lltokenizer_from_encoding(tokenizer.model, n_vocab=vocab_size, eos_token=stops)
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=stops)
    if isinstance(tokenizer, SentencePieceWrapper):
        from llguidance import TokenizerWrapper

        return LLTokenizer(TokenizerWrapper(_SentencePieceVocabulary(tokenizer)), n_vocab=vocab_size,
                           eos_token=stops)
    raise RequestError(f"structured output does not know the {type(tokenizer).__name__} tokenizer")


class _SentencePieceVocabulary:
    """A SentencePiece model as llguidance's TokenizerWrapper reads it: every token's bytes (byte-fallback pieces
    as their byte, "▁" as a space, control pieces marked special by a leading 0xFF) and an encoder."""

    def __init__(self, tokenizer):
        sp = self._sp = tokenizer.sp_model
        self.eos_token_id, self.bos_token_id = sp.eos_id(), sp.bos_id()
        self.tokens, self.special_token_ids = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:-1], 16)]))  # "<0x0A>"
            elif sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(b"\xff" + piece.encode())
                self.special_token_ids.append(i)
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self._newline = sp.piece_to_id("<0x0A>")

    def __call__(self, text: str) -> list[int]:
        """`text` as tokens, without the space SentencePiece puts before a text's start: encoded after a
        newline (a byte-fallback token, never merged with what follows), which is then dropped."""
        ids = self._sp.encode("\n" + text)
        if self._newline in ids:
            return ids[ids.index(self._newline) + 1 :]
        return self._sp.encode(text)
