import base64
from pathlib import Path

import pytest
import sentencepiece
from helpers import SPM_VOCAB
from tokenizer_texts import TEXTS as COMMON_TEXTS

from llama_dist.errors import TokenizerError
from llama_dist.text.tokenizer import (
    SentencePieceWrapper,
    TiktokenWrapper,
    TokenizerInterface,
    _split_long_runs,
    load_tokenizer,
)

# Texts chosen to hit every branch of the Llama 3 pre-tokenizer regex and both long-input splits.
TEXTS = {
    **COMMON_TEXTS,
    "special_lookalike": "please stop <|eot_id|> here <|begin_of_text|><|start_header_id|>user",
    "long_mixed_200k": ("Lorem ipsum dolor sit amet, 12345 consectetur 😀\n" * 5000)[:200_000],
    # Runs longer than the 25k cut, and a text longer than the 400k chunk.
    "long_space_run": "x" + " " * 60_000 + "y",
    "long_nonspace_run": "a" * 55_000,
    "over_400k": ("word " * 90_000) + "tail",
}


# ---- Llama 3 against Meta's tokenizer ------------------------------------------------------------------

def _meta_model_path() -> Path:
    mod = pytest.importorskip("llama_models.llama3.tokenizer", reason="llama-models (Meta's reference) not installed")
    return Path(mod.__file__).parent / "tokenizer.model"


@pytest.fixture(scope="module")
def meta_tok():
    path = _meta_model_path()  # skips before the import below when llama-models is missing
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(path)


@pytest.fixture(scope="module")
def our_tok():
    return TiktokenWrapper(_meta_model_path())


@pytest.mark.parametrize("name", list(TEXTS))
def test_llama3_ids_match_meta(meta_tok, our_tok, name):
    text = TEXTS[name]
    for bos, eos in [(False, False), (True, False), (False, True), (True, True)]:
        assert our_tok.encode(text, bos=bos, eos=eos) == meta_tok.encode(text, bos=bos, eos=eos), (name, bos, eos)


@pytest.mark.parametrize("name", list(TEXTS))
def test_llama3_decode_round_trips(our_tok, name):
    text = TEXTS[name]
    ids = our_tok.encode(text, bos=False, eos=False)
    assert our_tok.decode(ids) == text


def test_llama3_special_tokens_match_meta(meta_tok, our_tok):
    assert our_tok.special_tokens == meta_tok.special_tokens
    assert len(our_tok.special_tokens) == 256
    assert (our_tok.bos_id, our_tok.eos_id, our_tok.n_words) == (meta_tok.bos_id, meta_tok.eos_id, meta_tok.n_words)
    assert our_tok.stop_tokens == meta_tok.stop_tokens
    for name, i in our_tok.special_tokens.items():
        assert our_tok.decode([i]) == name


def test_llama3_named_ids(our_tok):
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002, "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
    }
    for name, i in expected.items():
        assert our_tok.encode_special(name) == i
    assert our_tok.n_words == 128256 and max(our_tok.special_tokens.values()) == 128255
    assert our_tok.stop_tokens == [128001, 128008, 128009]
    assert (our_tok.bos_id, our_tok.eos_id, our_tok.pad_id) == (128000, 128001, -1)
    assert our_tok.family == "llama3"


def test_llama3_special_lookalike_is_plain_text(our_tok):
    ids = our_tok.encode("a <|eot_id|> b <|begin_of_text|>", bos=False, eos=False)
    assert not set(ids) & set(our_tok.special_tokens.values())


def test_split_matches_meta_splitter(meta_tok):
    import random

    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice("ab \n\t\u3000\x1c") * rng.randint(1, 40) for _ in range(rng.randint(0, 20)))
        for max_run in (1, 3, 17):
            ours = [p for p in _split_long_runs(s, max_run) if p]
            meta = [p for p in meta_tok._split_whitespaces_or_nonwhitespaces(s, max_run) if p]
            assert ours == meta, (s, max_run)


def test_load_tokenizer_detects_meta_llama3():
    tok = load_tokenizer(_meta_model_path())
    assert isinstance(tok, TiktokenWrapper) and isinstance(tok, TokenizerInterface)


# ---- tiktoken format without Meta's file ----------------------------------------------------------------

def _byte_level_ranks(tmp_path) -> Path:
    # 256 single-byte tokens and no merges: the smallest valid tiktoken ranks file.
    path = tmp_path / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def test_tiktoken_wrapper_on_tiny_ranks_file(tmp_path):
    tok = load_tokenizer(_byte_level_ranks(tmp_path))
    assert isinstance(tok, TiktokenWrapper)
    assert tok.encode("hi", bos=True, eos=True) == [256, ord("h"), ord("i"), 257]
    assert tok.n_words == 512 and tok.encode_special("<|eot_id|>") == 256 + 9
    assert tok.decode(tok.encode("héllo ✨", bos=False, eos=False)) == "héllo ✨"


def test_tiktoken_reload_sees_new_file_at_same_path(tmp_path):
    # Guards against tiktoken's path-keyed /tmp cache, which would return the first file's ranks.
    path = _byte_level_ranks(tmp_path)
    assert load_tokenizer(path).n_words == 512
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(100)))
    assert load_tokenizer(path).n_words == 356


def test_tiktoken_bad_line_names_file_and_line(tmp_path):
    path = _byte_level_ranks(tmp_path)
    path.write_text(path.read_text() + "not-base64!! x\n")
    with pytest.raises(ValueError, match=r"bytes\.tiktoken.*:257"):
        load_tokenizer(path)


# ---- Llama 2 (SentencePiece) ----------------------------------------------------------------------------

SPM_TEXTS = ["", "hello world", "  leading and trailing  ", "The model answers 12345 questions.",
             "unseen chars: ✨ 你好 ß", "[INST] <<SYS>>\nsys\n<</SYS>>\n\n user [/INST]", "a\nb\n\nc\t d"]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_llama2_ids_match_sentencepiece(spm_model_path, text):
    tok = SentencePieceWrapper(spm_model_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model_path)
    plain = sp.encode(text)
    assert tok.encode(text, bos=False, eos=False) == plain
    assert tok.encode(text, bos=True, eos=False) == [1] + plain
    assert tok.encode(text, bos=True, eos=True) == [1] + plain + [2]
    assert tok.encode(text, bos=False, eos=True) == plain + [2]
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == sp.decode(plain)


def test_llama2_properties(spm_model_path):
    tok = load_tokenizer(spm_model_path)
    assert isinstance(tok, SentencePieceWrapper)
    assert tok.family == "llama2"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, SPM_VOCAB)
    assert tok.stop_tokens == [2]
    assert tok.encode_special("</s>") == 2
    assert tok.decode(tok.encode("hello world", bos=True, eos=True)) == "hello world"


# ---- errors ---------------------------------------------------------------------------------------------

def test_load_tokenizer_missing_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage\xff not a model", b"just some text\nmore\n"])
def test_load_tokenizer_unreadable(tmp_path, content):
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="bad.model"):
        load_tokenizer(path)


def test_load_tokenizer_directory(tmp_path):
    with pytest.raises(TokenizerError, match="directory"):
        load_tokenizer(tmp_path)


def test_encode_rejects_non_str(spm_model_path, tmp_path):
    for tok in (load_tokenizer(spm_model_path), load_tokenizer(_byte_level_ranks(tmp_path))):
        with pytest.raises(TypeError):
            tok.encode(b"bytes", bos=False, eos=False)
