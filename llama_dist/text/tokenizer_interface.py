"""What generation and chat formatting need from a tokenizer: the interface every tokenizer wrapper implements
(`tokenizer.SentencePieceWrapper`, `tokenizer.TiktokenWrapper`, `tokenizer_hf.HuggingFaceTokenizer`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from llama_dist.errors import TokenizerError

__all__ = ["TokenId", "TokenizerInterface", "check_text"]


class TokenId(int):
    """A special token's id: an int (Meta's `tokenizer.bos_id`) that may also be called (gpt-fast's
    `tokenizer.bos_id()`), so code written against either tokenizer API runs unchanged."""

    def __call__(self) -> int:
        return int(self)


class TokenizerInterface:
    """What generation and chat formatting need from a tokenizer.

    Subclasses implement encode/decode and set the `_bos`, `_eos`, `_pad`, `_n_words`, `_stop` fields
    in `__init__`; the read-only properties below serve them.
    """

    family: str = ""  # "llama2" or "llama3": selects the built-in chat format
    # A jinja2 chat template that replaces the built-in format (Hugging Face tokenizers that ship one), and the
    # named special tokens it may use ({"bos_token": "<|begin_of_text|>", ...}).
    chat_template: str | None = None
    template_tokens: Mapping[str, str] = MappingProxyType({})
    special_tokens: dict[str, int]
    _bos: int
    _eos: int
    _pad: int  # -1 when the model has no pad token
    _n_words: int  # vocabulary size including special tokens
    _stop: list[int]  # ids that end a generation

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`, with the BOS / EOS token when asked (keyword or Meta's positional arguments)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def bos_id(self) -> TokenId:
        return TokenId(self._bos)

    @property
    def eos_id(self) -> TokenId:
        return TokenId(self._eos)

    @property
    def pad_id(self) -> TokenId:
        return TokenId(self._pad)

    @property
    def n_words(self) -> int:
        return self._n_words

    @property
    def stop_tokens(self) -> list[int]:
        return list(self._stop)

    def encode_template_output(self, text: str) -> list[int]:
        """Ids of text a chat template wrote: special tokens spelled in it are those tokens, nothing is added."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    def vocab_mismatch(self, model_vocab_size: int) -> str | None:
        """Why a model with `model_vocab_size` embedding rows cannot use this tokenizer (a phrase such as "has
        32000 tokens"), or None when it can. A SentencePiece or tiktoken vocabulary is the model's own: the
        sizes must be equal."""
        return None if self.n_words == model_vocab_size else f"has {self.n_words} tokens"

    def encode_special(self, name: str) -> int:
        """Id of a special token by its literal name, e.g. "<|eot_id|>"."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{type(self).__name__} has no special token {name!r}") from None


def check_text(text: object) -> None:
    # Checked here so a bad prompt fails with a readable message rather than inside a C extension.
    if not isinstance(text, str):
        raise TypeError(f"expected text of type str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Python hands undecodable input bytes over as lone surrogates (U+DC80..U+DCFF stand for 0x80..0xFF).
        code = ord(text[exc.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
        raise TokenizerError(
            f"the text is not valid UTF-8: it holds {what} at character {exc.start} (is the terminal or file in "
            f"another encoding?)"
        ) from None
