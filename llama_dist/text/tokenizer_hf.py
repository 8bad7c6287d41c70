"""Hugging Face `tokenizer.json` tokenizers, through the `tokenizers` library, behind TokenizerInterface.

A Hugging Face tokenizer is spread over its directory, and each file is read the way transformers reads it:

    tokenizer.json          the tokenizer itself: vocabulary, merges, pre-tokenizer, added (special) tokens
    tokenizer_config.json   bos_token / eos_token / pad_token, the chat template
    chat_template.jinja     the chat template, when kept in a file of its own (it wins over tokenizer_config.json)
    generation_config.json  eos_token_id (an int or a list): the ids that end a generation
    config.json             eos_token_id when generation_config.json has none; vocab_size, the model's vocabulary

Ids match transformers' `AutoTokenizer` (transformers 5, whose decode never applies
`clean_up_tokenization_spaces` to a BPE tokenizer, so neither does this one).
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_dist.errors import TokenizerError
from llama_dist.text.tokenizer_interface import TokenizerInterface, check_text

__all__ = ["HuggingFaceTokenizer", "NAMED_SPECIAL_TOKENS"]

# The special-token names transformers keeps in tokenizer_config.json and passes to chat templates.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# With these, a tokenizer that ships no chat template still gets Meta's Llama 3 format.
_LLAMA3_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def _token_text(value, where: str) -> str | None:
    # transformers writes a token either as its text or as an AddedToken dict {"content": ..., ...}.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: a token must be a string or a {{'content': ...}} object, got {value!r:.80}")


def _chat_template(folder: Path, config: dict) -> str | None:
    """The directory's default chat template: chat_template.jinja, else tokenizer_config.json's "chat_template"
    (a string, or a list of {"name", "template"} of which "default" is the one for chat)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {jinja_file}: {e}") from e
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    where = folder / "tokenizer_config.json"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(f"{where}: chat_template lists templates {sorted(map(str, named))} but none named 'default'")
    raise TokenizerError(f"{where}: chat_template must be a string or a list of named templates")


def _eos_token_ids(folder: Path) -> tuple[list[int], Path] | None:
    """eos_token_id from generation_config.json, else config.json, as a list; None when neither has one."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        value = (_read_json(path) or {}).get("eos_token_id")
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise TokenizerError(f"{path}: eos_token_id must be a token id or a non-empty list of them, got {value!r}")
        return list(dict.fromkeys(ids)), path
    return None


class HuggingFaceTokenizer(TokenizerInterface):
    """A `tokenizer.json` with the files beside it (see the module docstring).

    encode(text, bos, eos) reads special-token spellings in `text` as plain text, like the tiktoken wrapper (and
    transformers with `split_special_tokens=True`), so a prompt cannot forge a header or end a turn. Chat template
    output goes through `encode_template_output`, which reads them as the tokens they name, as transformers'
    `apply_chat_template` does.

    n_words is the model's vocabulary as transformers counts it: config.json's vocab_size when the directory has
    one, else one past the highest id the tokenizer knows. `vocab_mismatch` accepts any model whose embedding has
    a row for every id the tokenizer can produce: checkpoints often pad the embedding past the tokenizer
    (to a multiple of 64 or 128), and transformers runs those.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        self.model_path = str(path)
        folder = path.parent
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own Exception type for every kind of bad file
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json the tokenizers library can load: {e}") from e
        # Plain-text reading of special-token spellings by default; encode_template_output switches it off.
        self._tokenizer.encode_special_tokens = True

        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) or {}
        self.template_tokens = {}
        for name in NAMED_SPECIAL_TOKENS:
            text = _token_text(config.get(name), f"{config_path}: {name}")
            if text is not None:
                self.template_tokens[name] = text
        self.special_tokens = {token.content: i for i, token in self._tokenizer.get_added_tokens_decoder().items()}
        self._highest_id = max(self._tokenizer.get_vocab(with_added_tokens=True).values())

        self._bos = self._id_of("bos_token", config_path)
        self._eos = self._id_of("eos_token", config_path)
        self._pad = self._id_of("pad_token", config_path)
        eos_ids = _eos_token_ids(folder)
        self._stop = eos_ids[0] if eos_ids else ([self._eos] if self._eos >= 0 else [])
        model_config = _read_json(folder / "config.json") or {}
        vocab_size = model_config.get("vocab_size")
        self._n_words = vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else self._highest_id + 1
        self.chat_template = _chat_template(folder, config)

        # Without a template, a tokenizer with Llama 3's header tokens chats in Meta's Llama 3 format, and one
        # with Llama 2's "<s>" in Meta's [INST] format; any other needs a template.
        if self._bos >= 0 and all(t in self.special_tokens for t in _LLAMA3_CHAT_TOKENS):
            self.family = "llama3"
        elif self.template_tokens.get("bos_token") == "<s>":
            self.family = "llama2"
        else:
            self.family = ""

    def _id_of(self, name: str, config_path: Path) -> int:
        """The id of the named special token, -1 when tokenizer_config.json names none."""
        text = self.template_tokens.get(name)
        if text is None:
            return -1
        token_id = self._tokenizer.token_to_id(text)
        if token_id is None:
            raise TokenizerError(f"{config_path} names {name} {text!r}, which {self.model_path} does not hold")
        return token_id

    def to_json(self) -> str:
        """The tokenizer.json this tokenizer was read from, as the tokenizers library writes it (for libraries that
        build their own view of the vocabulary, such as the grammar library)."""
        return self._tokenizer.to_str()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`, with BOS / EOS when asked and the tokenizer has them."""
        check_text(text)
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if bos and self._bos >= 0:
            ids.insert(0, self._bos)
        if eos and self._eos >= 0:
            ids.append(self._eos)
        return ids

    def encode_template_output(self, text: str) -> list[int]:
        check_text(text)
        self._tokenizer.encode_special_tokens = False
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self._tokenizer.encode_special_tokens = True

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def vocab_mismatch(self, model_vocab_size: int) -> str | None:
        if self._highest_id >= model_vocab_size:
            return f"has token ids up to {self._highest_id}"
        return None
