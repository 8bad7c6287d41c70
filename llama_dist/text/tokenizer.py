"""Tokenizers for Llama 2 (SentencePiece) and Llama 3 (tiktoken BPE), behind `TokenizerInterface`
(tokenizer_interface.py), which Hugging Face `tokenizer.json` files implement too (tokenizer_hf.py).

Each produces exactly the ids its reference produces (Meta's tokenizers, transformers); `load_tokenizer` picks the
right one from the file's name and contents, so callers only ever pass a path.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Iterable, Iterator

from llama_dist.errors import TokenizerError
from llama_dist.text.tokenizer_interface import TokenizerInterface, check_text

__all__ = [
    "TokenizerInterface", "SentencePieceWrapper", "TiktokenWrapper", "load_tokenizer", "train_llama2_style_tokenizer"
]


class SentencePieceWrapper(TokenizerInterface):
    """Llama 2 `tokenizer.model` (a SentencePiece protobuf)."""

    family = "llama2"

    def __init__(self, model_path: str | Path):
        from sentencepiece import SentencePieceProcessor

        self.model_path = str(model_path)
        self.sp_model = SentencePieceProcessor(model_file=self.model_path)
        self._bos = self.sp_model.bos_id()
        self._eos = self.sp_model.eos_id()
        self._pad = self.sp_model.pad_id()  # -1 for Llama 2: it has no pad piece
        self._n_words = self.sp_model.vocab_size()
        self._stop = [self._eos]
        self.special_tokens = {self.sp_model.id_to_piece(i): i for i in (self._bos, self._eos) if i >= 0}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        check_text(text)
        ids = list(self.sp_model.encode(text))
        if bos:
            ids.insert(0, self._bos)
        if eos:
            ids.append(self._eos)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp_model.decode(list(ids))


# The named Llama 3 special tokens, in id order after the base vocabulary; the rest of the 256 slots
# are reserved names. The names follow the llama_models package (Llama 3.1/3.2), where slot 11 is
# "<|image|>"; text models never emit it, but decode must name it the way Meta's tokenizer does.
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model wants a tool result before going on
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
_LLAMA3_NUM_SPECIALS = 256

# Llama 3 pre-tokenizer: contractions, words with one leading non-letter, digits in groups of at most
# three, punctuation runs, newlines, and whitespace.
_LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tiktoken panics above ~400k chars per call, and its BPE goes quadratic on one very long run of
# whitespace or of non-whitespace (openai/tiktoken#195). Meta cuts at these exact sizes; cutting at the
# same places is what keeps our ids identical to theirs on pathological inputs.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")  # Python's \s is str.isspace(), the test Meta's splitter uses


def _split_long_runs(text: str, max_run: int) -> Iterator[str]:
    """Cut `text` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    A cut lands every `max_run` chars into an over-long run, counted from where the run starts.
    """
    start = 0
    for run in _RUN.finditer(text):
        cut = run.start() + max_run
        while cut < run.end():
            yield text[start:cut]
            start = cut
            cut += max_run
    if start < len(text):
        yield text[start:]


def _load_bpe_ranks(path: str) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `<base64 token> <rank>` per line.

    Not `tiktoken.load.load_tiktoken_bpe`: that caches contents under /tmp keyed by the path string
    alone, so a different file later placed at the same path would silently load the old ranks.
    """
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise TokenizerError(f"{path}:{lineno}: not a `<base64 token> <rank>` line: {line[:80]!r}") from e
    return ranks


class TiktokenWrapper(TokenizerInterface):
    """Llama 3 / 3.x `tokenizer.model`: a tiktoken BPE ranks file (base64 token, rank per line)."""

    family = "llama3"

    def __init__(self, model_path: str | Path):
        import tiktoken

        self.model_path = str(model_path)
        mergeable_ranks = _load_bpe_ranks(self.model_path)
        num_base = len(mergeable_ranks)
        names = _LLAMA3_NAMED_SPECIALS + [
            f"<|reserved_special_token_{i}|>" for i in range(2, 2 + _LLAMA3_NUM_SPECIALS - len(_LLAMA3_NAMED_SPECIALS))
        ]
        self.special_tokens = {name: num_base + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=Path(self.model_path).name,
            pat_str=_LLAMA3_PAT,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self._n_words = num_base + len(names)
        self._bos = self.special_tokens["<|begin_of_text|>"]
        self._eos = self.special_tokens["<|end_of_text|>"]
        self._stop = [self._eos, self.special_tokens["<|eom_id|>"], self.special_tokens["<|eot_id|>"]]
        # -1 as in Meta's Llama 3 generate: a pad that is never a real token keeps "is this a prompt
        # position" unambiguous. The finetuning pad token stays reachable via special_tokens.
        self._pad = -1

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        check_text(text)
        ids: list[int] = [self._bos] if bos else []
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS):
                # User text that spells a special token ("<|eot_id|>") is plain text, never a control
                # token: otherwise a prompt could end a turn or forge a header.
                ids.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        if eos:
            ids.append(self._eos)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(list(ids))


def _looks_like_tiktoken_ranks(head: bytes) -> bool:
    """True when the first line of the file is `<base64 token> <integer rank>`."""
    first_line = head.split(b"\n", 1)[0].strip()
    fields = first_line.split()
    if len(fields) != 2 or not fields[1].isdigit():
        return False
    try:
        base64.b64decode(fields[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _looks_like_tokenizer_json(path: Path, head: bytes) -> bool:
    return path.suffix == ".json" or head.lstrip().startswith(b"{")


def load_tokenizer(path: str | Path) -> TokenizerInterface:
    """Open a Llama 2 or Llama 3 `tokenizer.model` (detecting which from its contents) or a Hugging Face
    `tokenizer.json` (a `.json` name or JSON contents), with its directory's tokenizer_config.json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.is_dir():
        raise TokenizerError(
            f"tokenizer path {path} is a directory; pass the tokenizer.model or tokenizer.json file inside it"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e
    if not head:
        raise TokenizerError(f"tokenizer file {path} is empty")

    if _looks_like_tokenizer_json(path, head):
        from llama_dist.text.tokenizer_hf import HuggingFaceTokenizer

        return HuggingFaceTokenizer(path)
    if _looks_like_tiktoken_ranks(head):
        try:
            return TiktokenWrapper(path)
        except Exception as e:
            raise TokenizerError(f"{path} looks like a tiktoken BPE ranks file but failed to load: {e}") from e
    try:
        return SentencePieceWrapper(path)
    except Exception as e:
        raise TokenizerError(
            f"{path} is neither a tiktoken BPE ranks file (Llama 3) nor a SentencePiece model (Llama 2): {e}"
        ) from e


def train_llama2_style_tokenizer(lines: Iterable[str], vocab_size: int, out_path: str | Path) -> Path:
    """Train a SentencePiece BPE tokenizer laid out like Llama 2's (unk 0, bos 1, eos 2, no pad, byte
    fallback, no normalisation) and write it to `out_path`: for toy models and tests, not for real use."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        num_threads=1,  # one thread: the same text gives the same model, byte for byte
        minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.write_bytes(buffer.getvalue())
    return out_path
