"""Structured output's cost: `python -m llama_dist.bench guided --ckpt_dir DIR --tokenizer_path TOKENIZER`.

Decode tok/s at a fixed token count (ignore_eos) for batch 1 and `batch`, unconstrained against a JSON schema
grammar (an array of strings: it never completes before max_tokens), interleaved, best of `repeats`. The grammar's
cost is rank 0's mask per row and step, so a real vocabulary matters: the 1B-shaped random checkpoint
(`bench make-checkpoint`) with Llama 3's tokenizer (shipped in the llama-models package).
"""

from __future__ import annotations

import json
import time

import torch

from llama_dist.bench.decode import listed
from llama_dist.dist.groups import print0
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.structured_output import Grammar
from llama_dist.llm import Llama

SCHEMA = {"type": "array", "items": {"type": "string"}}


def _decode_tok_s(llm: Llama, batch: int, tokens: int, grammar: Grammar | None, prompt: list[int]) -> float:
    """Generated tokens per second of `batch` requests of `tokens` tokens each, from after every first token."""
    engine = llm.engine
    if engine.is_main:
        for i in range(batch):
            engine.add_request(i, prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=True,
                                                         guided=grammar))
    counts, started = {}, None
    for outputs in engine.run_until_done():
        if started is None and len(counts) == batch:
            started, at_start = time.perf_counter(), sum(counts.values())
        for output in outputs:
            counts[output.request_id] = counts.get(output.request_id, 0) + len(output.new_token_ids)
    return (sum(counts.values()) - at_start) / (time.perf_counter() - started) if started else float("nan")


def run(ckpt_dir: str = "bench_out/llama32_1b_shape", tokenizer_path: str | None = None, dtype: str = "bfloat16",
        batch_sizes: str | int | tuple = "1,8", tokens: int = 32, repeats: int = 3) -> None:
    sizes = listed(batch_sizes)
    llm = Llama.build(ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=64 + tokens, max_batch_size=max(sizes),
                      dtype=dtype)
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    if llm.dist.is_main:
        started = time.perf_counter()
        llm.engine.grammars.check(grammar)  # the vocabulary's one-off build, as a server does on its first grammar
        print0(f"grammar vocabulary of {llm.model.args.vocab_size} tokens built in {time.perf_counter() - started:.2f} s")
    prompt = llm.tokenizer.encode("Some names of animals as a JSON list:", bos=True, eos=False)
    best: dict[tuple[int, str], list[float]] = {}
    for _ in range(repeats):
        for size in sizes:
            for label, g in (("unconstrained", None), ("JSON schema", grammar)):
                best.setdefault((size, label), []).append(_decode_tok_s(llm, size, tokens, g, prompt))
    print0(f"\n{ckpt_dir}, {dtype}, {torch.get_num_threads()} threads/rank: decode tok/s at {tokens} tokens a "
           f"request (ignore_eos), interleaved, best of {repeats}")
    print0("| batch | unconstrained tok/s | JSON schema tok/s | guided / unconstrained | rounds (guided) |")
    print0("|---|---|---|---|---|")
    for size in sizes:
        free, guided = max(best[(size, "unconstrained")]), max(best[(size, "JSON schema")])
        rounds = ", ".join(f"{v:.1f}" for v in best[(size, "JSON schema")])
        print0(f"| {size} | {free:.1f} | {guided:.1f} | {guided / free:.2f}x | {rounds} |")
