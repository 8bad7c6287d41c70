"""Speculative decoding through the engine, by prompt lookup and by a draft model (the model's own int4 copy), at 1
and 2 gloo ranks, on the bundled (counting) model:
greedy output and log-probabilities as without speculation, fewer steps, stops inside a kept run of guesses, and a
cache and prefix index after rejections as if the rejected guesses never came."""

from pathlib import Path

import pytest
import torch

from llama_dist.checkpoint.loader import load_model, open_checkpoint
from llama_dist.dist.local_launch import run_local
from llama_dist.engine.llm_engine import EngineConfig, LLMEngine
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.speculative import SpeculativeConfig
from llama_dist.llm import Llama
from llama_dist.model.quant import make_scheme

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
COUNT = "one two three four five six seven eight nine ten eleven twelve"
# The model counts on from its prompt's last number: a prompt that starts counting again copies its own beginning,
# which prompt lookup guesses right.
PROMPTS = {"count": COUNT, "copy": "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen ten eleven",
           "short": "five six"}
TOLERANCE = 1e-5


def _run(engine: LLMEngine, requests: dict, checks: list) -> dict:
    """Add {id: (prompt ids, params)} on rank 0 and step to the end; rank 0's outputs by id. After every step,
    `checks` gets whether each running sequence holds no block beyond what its tokens need (and, with a draft
    model, whether the draft's cache is at most one token behind the model's)."""
    if engine.is_main:
        for request_id, (prompt, params) in requests.items():
            engine.add_request(request_id, prompt, params, detokenize=True)
    collected = {}
    for outputs in engine.run_until_done():
        for output in outputs:
            collected.setdefault(output.request_id, []).append(output)
        if engine.is_main:
            blocks = engine.block_manager
            checks += [blocks.blocks_for(seq.num_computed_tokens) <= len(seq.block_table) <= blocks.blocks_for(
                seq.num_tokens) for seq in engine.scheduler.running]
            if engine.draft is not None:  # the draft keeps up: prompt chunks in their own steps, guesses after
                checks += [seq.num_draft_computed >= seq.num_computed_tokens - 1 for seq in engine.scheduler.running]
    return collected


def _summary(outputs: list) -> dict:
    return {"tokens": [t for o in outputs for t in o.new_token_ids],
            "logprobs": [lp for o in outputs for lp in (o.new_logprobs or [])],
            "top": [t for o in outputs for t in (o.new_top_logprobs or [])],
            "text": "".join(o.text for o in outputs), "reason": outputs[-1].finish_reason}


def speculative_worker() -> dict:
    llm = Llama.build(str(TINY), max_seq_len=160, max_batch_size=4, dtype="float32", compile=False)
    device, main = llm.dist.device, llm.dist.is_main
    ids = {k: llm.tokenizer.encode(p, bos=True, eos=False) for k, p in PROMPTS.items()}
    greedy = SamplingParams(temperature=0, max_tokens=60, logprobs=True, top_logprobs=2)
    requests = {k: (p, greedy) for k, p in ids.items()}
    requests["cut"] = (ids["count"], SamplingParams(temperature=0, max_tokens=7))  # ends inside a kept run
    requests["stop"] = (ids["count"], SamplingParams(temperature=0, max_tokens=60, stop=[" twenty two"]))
    # The draft: the model itself with int4 weights (sharded like it), its own cache pool.
    draft = load_model(open_checkpoint(str(TINY), max_seq_len=160, max_batch_size=4), device=device,
                       dtype=torch.float32, quantize=make_scheme("int4", 32, False))
    out = {}
    for name, speculative, draft_model in (
            ("plain", None, None), ("ngram", SpeculativeConfig(num_tokens=4, ngram_min=1), None),
            ("draft", SpeculativeConfig("draft", num_tokens=3, draft_quantize="int4"), draft)):
        engine = LLMEngine(llm.model, llm.tokenizer, device, main, EngineConfig(speculative=speculative),
                           draft_model=draft_model)
        checks: list[bool] = []
        together = _run(engine, requests, checks)
        alone = _run(engine, {"copy": requests["copy"]}, checks)  # batch 1 too
        steps = engine.metrics.steps
        sampled = _run(engine, {"s": (ids["count"], SamplingParams(temperature=0.8, seed=3, max_tokens=40))}, checks)
        if main:
            blocks = engine.block_manager
            out[name] = {
                "together": {k: _summary(v) for k, v in together.items()}, "alone": _summary(alone["copy"]),
                "sampled": _summary(sampled["s"]), "steps": steps, "blocks_fit": all(checks),
                "prefix_index": sorted(b.tokens for b in blocks.blocks if b.key is not None),
                "all_free": blocks.num_free_blocks == blocks.num_usable_blocks,
                "accepted": (engine.metrics.spec_accepted_tokens, engine.metrics.spec_draft_tokens),
                "mean_accepted_length": engine.metrics.mean_accepted_length,
            }
    return out


@pytest.fixture(scope="module")
def results():
    return {n: run_local(speculative_worker, n, timeout_s=300)[0] for n in (1, 2)}


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_greedy_output_and_logprobs_are_those_without_speculation(results, world_size, method):
    plain, ngram = results[world_size]["plain"], results[world_size][method]
    for name in PROMPTS:
        assert ngram["together"][name]["tokens"] == plain["together"][name]["tokens"], name
        assert len(plain["together"][name]["tokens"]) == 60
        assert ngram["together"][name]["logprobs"] == pytest.approx(plain["together"][name]["logprobs"], abs=TOLERANCE)
        assert [[i for i, _ in top] for top in ngram["together"][name]["top"]] == \
            [[i for i, _ in top] for top in plain["together"][name]["top"]]
    assert ngram["alone"]["tokens"] == plain["alone"]["tokens"]
    assert plain["together"]["count"]["text"].startswith(" thirteen fourteen fifteen")
    # Guesses were made and kept, so the same output took fewer steps.
    kept, guessed = ngram["accepted"]
    assert guessed > 0 and kept >= 4 and ngram["mean_accepted_length"] > 1
    assert ngram["steps"] < plain["steps"]
    if method == "draft":  # an int4 copy of a model guesses most of its tokens
        assert kept > guessed / 2 and ngram["mean_accepted_length"] > 2.5
    assert {k: v["tokens"] for k, v in ngram["together"].items()} == \
        {k: v["tokens"] for k, v in results[1][method]["together"].items()}


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_stop_inside_a_kept_run_ends_the_output_there(results, world_size, method):
    plain, ngram = results[world_size]["plain"]["together"], results[world_size][method]["together"]
    assert ngram["cut"]["tokens"] == plain["cut"]["tokens"] and len(plain["cut"]["tokens"]) == 7
    assert ngram["cut"]["reason"] == "length"
    assert ngram["stop"]["text"] == plain["stop"]["text"] and ngram["stop"]["reason"] == "stop"
    assert ngram["stop"]["text"].endswith(" twenty twenty one") and " twenty two" not in ngram["stop"]["text"]


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_rejected_guesses_leave_no_trace_in_the_cache(results, world_size, method):
    plain, ngram = results[world_size]["plain"], results[world_size][method]
    assert ngram["blocks_fit"]  # after every step: exactly the blocks the kept tokens need
    assert ngram["prefix_index"] == plain["prefix_index"]  # only blocks of kept tokens were published
    assert ngram["all_free"] and plain["all_free"]


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_sampled_requests_run_to_their_length(results, world_size, method):
    sampled = results[world_size][method]["sampled"]
    assert len(sampled["tokens"]) == 40 or sampled["reason"] == "stop"
    assert all(0 <= t < 512 for t in sampled["tokens"])
