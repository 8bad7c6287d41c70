"""Rank workers of the GPU tests (test_gpu.py). Module-level so `run_local` can start them in spawned ranks, and
free of CUDA calls at import, so the CUDA_VISIBLE_DEVICES a test gives a rank (run_local's env) still applies."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from llama_dist.dist.groups import init_distributed
from llama_dist.llm import Llama
from llama_dist.model.inspection import run_with_cache, to_tokens

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
# What the bundled model was trained on (checkpoints/README.md): greedy continuations with wide logit margins.
PROMPTS = ["one two three four", "a b c d", "monday tuesday", "the cat"]
GEN_LEN = 12
# Dialogs the model (trained on no chat) answers with 12 words rather than at once with its stop token.
DIALOGS = [[{"role": "user", "content": "a b c d e f"}], [{"role": "user", "content": "monday tuesday wednesday"}]]
INSPECTED = "one two three four five"


def _build(ctx, dtype: str, **extra) -> Llama:
    return Llama.build(TINY, max_seq_len=64, max_batch_size=len(PROMPTS), dtype=dtype, context=ctx, **extra)


def _greedy(llm: Llama) -> dict:
    prompts = [llm.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]  # ragged: 3 to 5 tokens
    tokens, logprobs = llm.generate(prompts, GEN_LEN, temperature=0, logprobs=True)
    return {"tokens": tokens, "logprobs": logprobs, "texts": [llm.tokenizer.decode(t) for t in tokens]}


def _inspect(llm: Llama) -> dict:
    tokens = to_tokens(llm, INSPECTED)
    with torch.inference_mode():
        out = llm.model(tokens, 0, output_hidden_states=True, output_attentions=True)
        _, cache = run_with_cache(llm.model, tokens, attentions=True)
    return {
        "logits": out.logits.cpu(),
        "hidden_states": [h.float().cpu() for h in out.hidden_states],
        "attentions": [a.cpu() for a in out.attentions],
        "cache": {name: t.float().cpu() for name, t in cache.items()},
    }


def generation_worker(dtypes: list[str], backend: str | None = None, device: str | None = None,
                      compile: bool | None = None) -> dict:
    """Greedy generation in each dtype; chat and inspection in the first one. compile: Llama.build's (None: the
    decode step is compiled on CUDA, eager on CPU)."""
    ctx = init_distributed(backend=backend, device=device)
    result = {"backend": ctx.backend, "device": str(ctx.device)}
    for dtype in dtypes:
        llm = _build(ctx, dtype, compile=compile)
        result["compiled"] = llm.decode_step.compiled
        result[dtype] = _greedy(llm)
        if dtype == dtypes[0]:
            answers = llm.chat_completion(DIALOGS, temperature=0, max_gen_len=GEN_LEN)
            result["chat"] = [answer["generation"] for answer in answers]
            result["inspection"] = _inspect(llm)
        del llm
    return result


def sync_worker() -> list[tuple[bool, int, int]]:
    """Host syncs in each engine step of a greedy batch, after a warm-up generation of the same shapes compiled the
    decode step and recorded its CUDA graphs: (whether the step computed prompt tokens, syncs torch's sync debug
    mode reported, CUDA runtime calls that block the host in the profiler's trace) per step."""
    from llama_dist.engine.sampling_params import SamplingParams

    ctx = init_distributed()
    llm = _build(ctx, "bfloat16")  # compiled, CUDA graphs: one rank
    prompts = [llm.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    llm.generate(prompts, GEN_LEN, temperature=0)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(i, prompt, SamplingParams(temperature=0, max_tokens=GEN_LEN, ignore_eos=True))
    blocking_calls = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
    steps = []
    while engine.has_unfinished():
        with warnings.catch_warnings(record=True) as caught, torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as trace:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.profiler.record_function("engine_step"):
                    engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        synced = sum("synchroniz" in str(w.message) for w in caught)
        # Within the step's own range: the profiler synchronises when it starts and stops.
        events = trace.events()
        step = next(e for e in events if e.name == "engine_step").time_range
        blocking = sum(1 for e in events if e.name in blocking_calls and step.start <= e.time_range.start <= step.end)
        steps.append((engine.runner.last_step_prefilled, synced, blocking))
    return steps


def start_worker() -> str:
    """init_distributed's outcome on this rank: its ConfigError's message, or the context it returned."""
    from llama_dist.errors import ConfigError

    try:
        ctx = init_distributed()
    except ConfigError as exc:
        return str(exc)
    return f"started {ctx.backend} on {ctx.device}"
