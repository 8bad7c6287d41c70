"""Structured output's grammars over the three tokenizer kinds: the allowed tokens follow the grammar, a finished
grammar says so, a padded vocabulary tail is never allowed, bad grammars are refused with a clear error."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance", reason="llguidance (the grammar library) not installed")

from llama_dist.engine.structured_output import Grammar, GrammarCompiler  # noqa: E402
from llama_dist.errors import RequestError  # noqa: E402
from llama_dist.text.tokenizer import load_tokenizer  # noqa: E402

PADDED = 64  # extra embedding rows past the tokenizer's vocabulary (models round their vocabulary up)


@pytest.fixture(scope="module", params=["sentencepiece", "tiktoken", "huggingface"])
def tokenizer(request, spm_model_path):
    if request.param == "sentencepiece":
        return load_tokenizer(spm_model_path)
    if request.param == "tiktoken":
        module = pytest.importorskip("llama_models.llama3.tokenizer", reason="llama-models not installed")
        return load_tokenizer(Path(module.__file__).parent / "tokenizer.model")
    return load_tokenizer(Path(request.getfixturevalue("hf_tokenizer_dir")) / "tokenizer.json")


def _walk(tokenizer, grammar: Grammar, pick) -> str:
    """Generate under the grammar, taking `pick(allowed ids)` each step, until it is finished (or 80 steps)."""
    compiler = GrammarCompiler(tokenizer, tokenizer.n_words + PADDED)
    guide = compiler.guide(grammar)
    tokens = []
    for _ in range(80):
        allowed = guide.allowed()
        assert allowed.shape == (tokenizer.n_words + PADDED,) and not allowed[tokenizer.n_words:].any()
        ids = [i for i in allowed.nonzero().flatten().tolist() if i not in tokenizer.stop_tokens]
        if not ids:  # only a stop token may come: the output is complete
            break
        token = pick(ids)
        guide.consume(token)
        tokens.append(token)
        if guide.finished:
            break
    return tokenizer.decode(tokens)


def test_a_regex_allows_only_what_can_still_match(tokenizer):
    text = _walk(tokenizer, Grammar("regex", "[0-9]{3}-[a-c]"), lambda ids: ids[len(ids) // 2])
    assert len(text) == 5 and text[:3].isdigit() and text[3] == "-" and text[4] in "abc", text


def test_a_choice_gives_one_of_its_strings(tokenizer):
    choices = ["the llama", "a model", "yes"]
    for pick in (min, max):
        assert _walk(tokenizer, Grammar("choice", json.dumps(choices)), pick) in choices


def test_a_json_schema_gives_valid_json(tokenizer):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "n"], "additionalProperties": False}
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        text = _walk(tokenizer, Grammar("json_schema", json.dumps(schema)),
                     lambda ids: ids[torch.randint(len(ids), (1,), generator=generator).item()])
        jsonschema.validate(json.loads(text), schema)


def test_bad_grammars_are_refused_clearly(spm_model_path):
    compiler = GrammarCompiler(load_tokenizer(spm_model_path), 512)
    with pytest.raises(RequestError, match="regex"):
        compiler.check(Grammar("regex", "(unclosed"))
    with pytest.raises(RequestError, match="JSON schema|json_schema"):
        compiler.check(Grammar("json_schema", "{not json"))
    with pytest.raises(RequestError, match="guided_choice"):
        compiler.check(Grammar("choice", "[]"))
    with pytest.raises(RequestError, match="grammar is one of"):
        Grammar("xml")
