"""The paged KV cache at 1 and 2 gloo ranks on the bundled model (fp32): greedy output with prefix caching on and
off, and with a pool so small that sequences are preempted and recomputed, equal to the plain engine's; cached
prompt blocks reported; a request that can never fit refused at admission."""

from pathlib import Path

import pytest

from llama_dist.dist.local_launch import run_local
from llama_dist.engine.llm_engine import EngineConfig, LLMEngine
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.errors import RequestError
from llama_dist.llm import Llama

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
HEADER = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
PROMPTS = [HEADER + tail for tail in (" seventeen", " eighteen nineteen", "", " a b c")] + ["a b c d e f"]


def _run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 30, seed: int | None = None) -> dict:
    if engine.is_main:
        for i, prompt in enumerate(prompts):
            engine.add_request(i, prompt, SamplingParams(temperature=0 if seed is None else 0.8, seed=seed,
                                                         max_tokens=max_tokens, ignore_eos=True))
    out = {}
    for outputs in engine.run_until_done():
        for o in outputs:
            tokens, cached = out.get(o.request_id, ([], 0))
            out[o.request_id] = (tokens + o.new_token_ids, max(cached, o.num_cached_tokens))
    return out


def paged_worker() -> dict:
    llm = Llama.build(TINY, max_seq_len=128, max_batch_size=4, dtype="float32", compile=False,
                      kernel_choice="static")
    prompts = [llm.tokenizer.encode(p, bos=True) for p in PROMPTS]
    device, main = llm.dist.device, llm.dist.is_main
    result = {}

    plain = LLMEngine(llm.model, llm.tokenizer, device, main, EngineConfig(prefix_caching=False))
    result["plain"] = _run(plain, prompts)
    cached = LLMEngine(llm.model, llm.tokenizer, device, main, EngineConfig())
    result["cold"] = _run(cached, prompts)
    result["warm"] = _run(cached, prompts)  # every prompt's full blocks are cached now
    result["hits"] = (cached.block_manager.hits, cached.block_manager.queries) if main else None
    # A pool of 5 blocks of 16 tokens for 4 running sequences of up to 21 + 30 tokens (4 blocks each).
    small = LLMEngine(llm.model, llm.tokenizer, device, main, EngineConfig(kv_cache_tokens=80))
    result["small"] = _run(small, prompts)
    result["preemptions"] = small.scheduler.num_preemptions if main else None
    # Seeded sampling survives preemption: each sequence's generator keeps its state.
    result["seeded_plain"] = _run(plain, prompts, seed=3)
    result["seeded_small"] = _run(small, prompts, seed=3)
    try:
        if main:
            small.add_request("big", prompts[0], SamplingParams(max_tokens=100))
        result["too_big"] = None
    except RequestError as exc:
        result["too_big"] = str(exc)
    return result


@pytest.fixture(scope="module")
def results():
    return {n: run_local(paged_worker, n, timeout_s=300) for n in (1, 2)}


def _tokens(run: dict) -> dict:
    return {k: tokens for k, (tokens, _) in run.items()}


@pytest.mark.parametrize("world_size", [1, 2])
def test_prefix_caching_gives_the_plain_engines_output(results, world_size):
    out = results[world_size][0]
    assert _tokens(out["cold"]) == _tokens(out["warm"]) == _tokens(out["plain"])
    assert all(len(tokens) == 30 for tokens, _ in out["plain"].values())
    assert _tokens(out["plain"]) == _tokens(results[1][0]["plain"])  # every world size computes the same


@pytest.mark.parametrize("world_size", [1, 2])
def test_cached_prompt_blocks_are_reused_and_reported(results, world_size):
    out = results[world_size][0]
    assert all(cached == 0 for _, cached in out["plain"].values())
    # Cold: admitted in one step, before any block was filled, so nothing to find yet.
    assert all(cached == 0 for _, cached in out["cold"].values())
    # Warm: each prompt finds its own full blocks again (its last token is always computed), the short one none.
    for i, (_, cached) in out["warm"].items():
        assert cached == (0 if i == 4 else 16)
    hits, queries = out["hits"]
    assert 0 < hits < queries


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_pool_too_small_for_everyone_preempts_and_recomputes_with_the_same_output(results, world_size):
    out = results[world_size][0]
    assert out["preemptions"] > 0
    assert _tokens(out["small"]) == _tokens(out["plain"])
    assert _tokens(out["seeded_small"]) == _tokens(out["seeded_plain"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_request_that_can_never_fit_is_refused_at_admission(results, world_size):
    assert "(18 tokens) and max_tokens (100) need 8 KV cache blocks of 16 tokens; the cache has 5" in (
        results[world_size][0]["too_big"])
