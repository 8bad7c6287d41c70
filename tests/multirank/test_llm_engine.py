"""The engine at 1 and 2 gloo ranks: chunked prefill gives the logits of one pass, batched requests equal the same
requests alone (greedy and seeded), stop strings, scoring a prompt without generating, abort mid-generation."""

import shutil

import pytest
import torch
from helpers import SPM_VOCAB, tiny_args, write_checkpoint

from llama_dist.dist.local_launch import run_local
from llama_dist.engine.llm_engine import EngineConfig, LLMEngine
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.llm import Llama

ARGS = tiny_args(vocab_size=SPM_VOCAB, n_kv_heads=2)
MAX_SEQ_LEN, MAX_BATCH = 96, 4
PROMPT = [1] + [(7 * i) % 300 + 3 for i in range(69)]  # 70 tokens
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_model_path) -> str:
    out = tmp_path_factory.mktemp("llm_engine") / "ckpt"
    write_checkpoint(out, ARGS, seed=9)
    shutil.copy(spm_model_path, out / "tokenizer.model")
    return str(out)


def _run(engine: LLMEngine, requests: dict) -> dict:
    """Add {id: (prompt, params[, detokenize])} on rank 0, step every rank to the end; rank 0's outputs by id."""
    if engine.is_main:
        for request_id, (prompt, params, *detokenize) in requests.items():
            engine.add_request(request_id, prompt, params, *detokenize)
    collected = {}
    for outputs in engine.run_until_done():
        for output in outputs:
            collected.setdefault(output.request_id, []).append(output)
    return collected


def _tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def engine_worker(ckpt: str) -> dict:
    llm = Llama.build(ckpt, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH, dtype="float32",
                      compile=False)
    device, main = llm.dist.device, llm.dist.is_main
    out = {}
    with torch.inference_mode():
        one_pass = torch.log_softmax(llm.model(torch.tensor([PROMPT]), 0).logits[0], dim=-1)
    out["one_pass_prompt"] = one_pass[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])].tolist()
    out["one_pass_last"] = one_pass[-1].topk(5).values.tolist()
    scoring = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=True, logprobs=True, top_logprobs=5)
    for budget in (1, 7, 64):
        engine = LLMEngine(llm.model, llm.tokenizer, device, main, EngineConfig(max_num_batched_tokens=budget))
        outputs = _run(engine, {"p": (PROMPT, scoring)}).get("p", [])
        if main:
            out[f"chunked_{budget}_prompt"] = outputs[0].prompt_logprobs
            out[f"chunked_{budget}_last"] = [lp for _, lp in outputs[0].new_top_logprobs[0]]
            out[f"chunked_{budget}_steps"] = engine.metrics.steps

    engine = LLMEngine(llm.model, llm.tokenizer, device, main, EngineConfig(max_num_batched_tokens=16))
    prompts = {"a": PROMPT[:9], "b": PROMPT[20:45], "c": PROMPT[50:53]}
    greedy = SamplingParams(temperature=0, max_tokens=12)
    seeded = {k: SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=i, max_tokens=12)
              for i, k in enumerate(prompts)}
    together = _run(engine, {k: (p, greedy) for k, p in prompts.items()})
    alone = {k: _run(engine, {k: (p, greedy)}).get(k) for k, p in prompts.items()}
    seeded_together = _run(engine, {k: (p, seeded[k]) for k, p in prompts.items()})
    seeded_alone = {k: _run(engine, {k: (p, seeded[k])}).get(k) for k, p in prompts.items()}
    if main:
        out["greedy"] = ({k: _tokens(v) for k, v in together.items()}, {k: _tokens(v) for k, v in alone.items()})
        out["seeded"] = ({k: _tokens(v) for k, v in seeded_together.items()},
                         {k: _tokens(v) for k, v in seeded_alone.items()})

    # A stop string: the text ends before it, the request with "stop".
    full = _run(engine, {"s": (PROMPT[:9], greedy, True)})
    text = "".join(o.text for o in full["s"]) if main else ""
    stop = text[len(text) // 2 : len(text) // 2 + 3] if main else ""
    stopped = _run(engine, {"s": (PROMPT[:9], SamplingParams(temperature=0, max_tokens=12, stop=[stop or "x"]))})
    if main:
        out["stop"] = (text, stop, "".join(o.text for o in stopped["s"]), stopped["s"][-1].finish_reason)

    # Scoring only: max_tokens 0 prefills and reports the prompt's logprobs, nothing generated.
    scored = _run(engine, {"z": (PROMPT[:30], SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=True))})
    if main:
        out["score_only"] = (scored["z"][-1].finish_reason, _tokens(scored["z"]), scored["z"][0].prompt_logprobs)

    # Abort mid-generation: the request ends "abort", the others finish, its cache row is free again.
    if main:
        engine.add_request("keep", PROMPT[:5], greedy)
        engine.add_request("drop", PROMPT[:6], SamplingParams(temperature=0, max_tokens=50))
    steps, aborted = 0, None
    for outputs in engine.run_until_done():
        steps += 1
        if main and steps == 3:
            aborted = engine.abort("drop")
    if main:
        out["abort"] = (aborted.finish_reason, aborted.finished, engine.scheduler.block_manager.usage)
    return out


@pytest.fixture(scope="module")
def results(ckpt):
    return {n: run_local(engine_worker, n, ckpt, timeout_s=300) for n in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("budget", [1, 7, 64])
def test_a_prompt_prefilled_in_chunks_gives_the_logits_of_one_pass(results, world_size, budget):
    out = results[world_size][0]
    prompt_logprobs = out[f"chunked_{budget}_prompt"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(PROMPT)
    assert torch.allclose(torch.tensor(prompt_logprobs[1:]), torch.tensor(out["one_pass_prompt"]), atol=TOLERANCE,
                          rtol=TOLERANCE)
    assert torch.allclose(torch.tensor(out[f"chunked_{budget}_last"]), torch.tensor(out["one_pass_last"]),
                          atol=TOLERANCE, rtol=TOLERANCE)
    assert out[f"chunked_{budget}_steps"] == -(-len(PROMPT) // budget)  # ceil: the prompt in chunks of the budget


@pytest.mark.parametrize("world_size", [1, 2])
def test_batched_requests_equal_the_same_requests_alone(results, world_size):
    out = results[world_size][0]
    together, alone = out["greedy"]
    assert together == alone and all(len(t) == 12 for t in together.values())
    seeded_together, seeded_alone = out["seeded"]
    assert seeded_together == seeded_alone  # a seeded request draws from its own stream
    assert out["greedy"] == results[1][0]["greedy"] and out["seeded"] == results[1][0]["seeded"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_stop_string_ends_the_text_before_it(results, world_size):
    text, stop, stopped_text, reason = results[world_size][0]["stop"]
    assert stop and stop in text
    assert stopped_text == text[: text.index(stop)] and reason == "stop"


@pytest.mark.parametrize("world_size", [1, 2])
def test_max_tokens_zero_scores_the_prompt_only(results, world_size):
    reason, tokens, prompt_logprobs = results[world_size][0]["score_only"]
    assert reason == "length" and tokens == []
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == 30
    assert prompt_logprobs[1:] == pytest.approx(results[world_size][0]["one_pass_prompt"][:29], abs=TOLERANCE)


@pytest.mark.parametrize("world_size", [1, 2])
def test_abort_mid_generation_frees_its_row(results, world_size):
    assert results[world_size][0]["abort"] == ("abort", True, 0.0)
