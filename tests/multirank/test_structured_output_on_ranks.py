"""Structured output and logit_bias in the engine, at 1 and 2 gloo ranks: grammars hold for random weights (greedy
and sampled, batched with unconstrained requests), the grammar's rows are masked on rank 0 only (every rank runs
the same steps), a -100 bias bans the greedy token, and a prompt's top logprobs come with its scores."""

import json
import re
import shutil

import pytest
from helpers import SPM_VOCAB, tiny_args, write_checkpoint

from llama_dist.dist.local_launch import run_local
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.structured_output import Grammar
from llama_dist.llm import Llama

pytest.importorskip("llguidance", reason="llguidance (the grammar library) not installed")

ARGS = tiny_args(vocab_size=SPM_VOCAB, n_kv_heads=2)
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer", "n"], "additionalProperties": False}
REGEX = "[0-9]{2}-[a-z]{3}"
CHOICES = ["the llama", "a model", "yes"]
PROMPT = [1, 17, 42, 99, 7, 250]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_model_path) -> str:
    out = tmp_path_factory.mktemp("structured") / "ckpt"
    write_checkpoint(out, ARGS, seed=3)
    shutil.copy(spm_model_path, out / "tokenizer.model")
    return str(out)


def structured_worker(ckpt: str) -> dict:
    llm = Llama.build(ckpt, max_seq_len=96, max_batch_size=8, dtype="float32", compile=False)
    engine = llm.engine
    grammars = {"json": Grammar("json_schema", json.dumps(SCHEMA)), "regex": Grammar("regex", REGEX),
                "choice": Grammar("choice", json.dumps(CHOICES))}
    requests = {}
    for name, grammar in grammars.items():
        requests[f"{name}-greedy"] = SamplingParams(temperature=0, max_tokens=40, guided=grammar)
        requests[f"{name}-sampled"] = SamplingParams(temperature=1.0, seed=5, max_tokens=40, guided=grammar)
    requests["free"] = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    if llm.dist.is_main:
        for request_id, params in requests.items():
            engine.add_request(request_id, PROMPT, params)
    tokens, reasons = {}, {}
    for outputs in engine.run_until_done():
        for output in outputs:
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finished:
                reasons[output.request_id] = output.finish_reason
    out = {"texts": {k: llm.tokenizer.decode(v) for k, v in tokens.items()}, "reasons": reasons,
           "free_tokens": tokens.get("free")}

    # logit_bias: -100 on the greedy token changes the first token; the others' logprobs stay the model's.
    if llm.dist.is_main:
        engine.add_request("plain", PROMPT, SamplingParams(temperature=0, max_tokens=1, logprobs=True))
    plain = [o for step in engine.run_until_done() for o in step]
    greedy_first = plain[0].new_token_ids[0] if plain else None
    if llm.dist.is_main:
        engine.add_request("banned", PROMPT, SamplingParams(temperature=0, max_tokens=1, logprobs=True,
                                                            logit_bias={greedy_first: -100}))
    banned = [o for step in engine.run_until_done() for o in step]
    out["greedy_first"], out["banned_first"] = greedy_first, banned[0].new_token_ids[0] if banned else None
    return out


@pytest.fixture(scope="module")
def results(ckpt):
    return {n: run_local(structured_worker, n, ckpt, timeout_s=600) for n in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_outputs_follow_their_grammars(results, world_size):
    jsonschema = pytest.importorskip("jsonschema")
    main = results[world_size][0]
    texts, reasons = main["texts"], main["reasons"]
    for mode in ("greedy", "sampled"):
        assert reasons[f"json-{mode}"] == "stop" and reasons[f"regex-{mode}"] == "stop"
        jsonschema.validate(json.loads(texts[f"json-{mode}"]), SCHEMA)
        assert re.fullmatch(REGEX, texts[f"regex-{mode}"]), texts[f"regex-{mode}"]
        assert texts[f"choice-{mode}"] in CHOICES
    assert len(main["free_tokens"]) == 6  # batched beside the grammars, unconstrained


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_banned_greedy_token_is_not_chosen(results, world_size):
    main = results[world_size][0]
    assert main["greedy_first"] is not None and main["banned_first"] != main["greedy_first"]


def test_ranks_agree_and_grammars_are_rank_zero_business(results):
    greedy = [k for k in results[1][0]["texts"] if "greedy" in k or k == "free"]
    assert [results[1][0]["texts"][k] for k in greedy] == [results[2][0]["texts"][k] for k in greedy]
    assert results[2][1]["texts"] == {}  # rank 1 only computes
