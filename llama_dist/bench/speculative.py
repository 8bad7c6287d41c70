"""Speculative decoding benchmark: `python -m llama_dist.bench spec` (one rank; under torchrun for N).

Three tables:
1. what verifying costs: one step of a (k+1)-token row (the newest token and k guesses, every position's logits,
   the verification on rank 0) against one decode step, batch 1, after a `context`-token prompt, for each k of
   `ks` (`ckpt_dir`, by default the Llama-3.2-1B-shaped random checkpoint);
2. prompt lookup end to end on a copy-heavy task with a trained model (`text_ckpt`, made by
   `checkpoints/make_text_model.py`): each prompt is a held-out paragraph, a blank line and the paragraph's first
   words, for a model to repeat the paragraph (or, with `--text_ckpt checkpoints/tiny`, a cycle the bundled model
   knows: days, months, the alphabet, once and a bit, which it goes on repeating); greedy, batch 1, tok/s with and
   without speculation (the outputs are checked equal), the share of guesses kept and the tokens per verify row;
3. a self-draft: the model's own int4 copy as the draft model, on `ckpt_dir` (random weights: what the int4 error
   alone does to the guesses), greedy, batch 1.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from llama_dist.bench.decode import TokenIdsOnly
from llama_dist.checkpoint.loader import load_model, open_checkpoint
from llama_dist.config import resolve_dtype
from llama_dist.dist.groups import init_distributed, print0
from llama_dist.engine.llm_engine import EngineConfig, LLMEngine
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.speculative import SpeculativeConfig
from llama_dist.engine.step_plan import PlanRow, StepPlan
from llama_dist.llm import Llama
from llama_dist.model.kernel_choice import choose_kernels, resolve_mode
from llama_dist.model.quant import DEFAULT_INT4_GROUP_SIZE, make_scheme


def verify_cost(ckpt_dir: str, dtype: str, context: int, ks: list[int], repeats: int,
                kernel_choice: str | None) -> None:
    ctx = init_distributed()
    max_k = max(ks)
    checkpoint = open_checkpoint(ckpt_dir, max_seq_len=context + max_k + 8, max_batch_size=1)
    model = load_model(checkpoint, device=ctx.device, dtype=resolve_dtype(dtype, ctx.device))
    choose_kernels(model, resolve_mode(kernel_choice))
    engine = LLMEngine(model, TokenIdsOnly(model.args.vocab_size), ctx.device, ctx.is_main, EngineConfig())
    blocks = list(range(1, 1 + engine.block_manager.blocks_for(context + max_k + 1)))  # keys: whatever is there
    gen = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0)

    def step(k: int) -> float:
        tokens = torch.randint(1, model.args.vocab_size, (k + 1,), generator=gen).tolist()
        plan = StepPlan(rows=[PlanRow(blocks, context, k + 1)], token_ids=tokens, logits_indices=list(range(k + 1)))
        started = time.perf_counter()
        logits = engine.runner.execute(plan)
        if logits is not None:
            if k:
                engine.sampler.verify([(logits, tokens[1:], greedy, None, None)])
            else:
                engine.sampler(logits, [greedy], [None])
        return time.perf_counter() - started

    times: dict[int, list[float]] = {k: [] for k in [0, *ks]}
    for _ in range(repeats):  # interleaved: a slow moment of a shared machine hits every k alike
        for k in times:
            times[k].append(step(k))
    decode = statistics.median(times[0])
    print0(f"\n1. One verify step of k guesses against one decode step: {ckpt_dir}, {ctx.world_size} rank(s), "
           f"{dtype}, batch 1, context {context} (median of {repeats}, interleaved)")
    print0("| k | row tokens | step ms | of a decode step |\n|---|---|---|---|")
    for k, samples in times.items():
        median = statistics.median(samples)
        print0(f"| {k or 'decode'} | {k + 1} | {1000 * median:.1f} | {median / decode:.2f}x |")


def self_draft(ckpt_dir: str, dtype: str, prompt_len: int, max_tokens: int, num_tokens: int, quantize: str,
               repeats: int, kernel_choice: str | None) -> None:
    ctx = init_distributed()
    checkpoint = open_checkpoint(ckpt_dir, max_seq_len=prompt_len + max_tokens + 8, max_batch_size=1)
    model = load_model(checkpoint, device=ctx.device, dtype=resolve_dtype(dtype, ctx.device))
    draft = load_model(checkpoint, device=ctx.device, dtype=resolve_dtype(dtype, ctx.device),
                       quantize=make_scheme(quantize, DEFAULT_INT4_GROUP_SIZE, False))
    for loaded in (model, draft):
        choose_kernels(loaded, resolve_mode(kernel_choice))
    tokenizer = TokenIdsOnly(model.args.vocab_size)
    prompt = torch.randint(1, model.args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    cases = {"no speculation": (None, None),
             f"{quantize} copy as draft, k={num_tokens}": (SpeculativeConfig("draft", num_tokens,
                                                                             draft_quantize=quantize), draft)}
    engines = {label: LLMEngine(model, tokenizer, ctx.device, ctx.is_main, EngineConfig(max_num_seqs=1,
                                                                                        speculative=spec),
                                draft_model=draft_model) for label, (spec, draft_model) in cases.items()}
    best, outputs = _race(engines, [prompt], greedy, repeats)
    print0(f"\n3. A self-draft: {ckpt_dir}, {ctx.world_size} rank(s), {dtype}, batch 1, a {prompt_len}-token random "
           f"prompt, {max_tokens} tokens, greedy; best of {repeats} (the time includes the prompt)")
    _table(engines, best, outputs, max_tokens)


def _race(engines: dict[str, LLMEngine], prompts: list[list[int]], params: SamplingParams,
          repeats: int) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Each engine generates for the prompts one at a time (batch 1), the engines taking turns `repeats` times (a slow
    moment of a shared machine hits them alike): each one's best seconds and its outputs."""
    best: dict[str, float] = {}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for label, engine in engines.items():
            tokens, started = [], time.perf_counter()
            for i, prompt in enumerate(prompts):
                if engine.is_main:
                    engine.add_request(i, prompt, params)
                tokens.append([t for outs in engine.run_until_done() for o in outs for t in o.new_token_ids])
            best[label] = min(best.get(label, float("inf")), time.perf_counter() - started)
            outputs[label] = tokens
    return best, outputs


def _table(engines: dict, best: dict, outputs: dict, tokens: int) -> None:
    plain = next(iter(engines))
    print0("| decoding | tok/s | speed-up | guesses kept | tokens per verify row | output as without |")
    print0("|---|---|---|---|---|---|")
    for label, engine in engines.items():
        metrics = engine.metrics
        kept = f"{metrics.acceptance_rate:.0%}" if metrics.acceptance_rate is not None else "-"
        per_row = f"{metrics.mean_accepted_length:.2f}" if metrics.mean_accepted_length is not None else "-"
        same = "yes" if outputs[label] == outputs[plain] else "NO"
        print0(f"| {label} | {tokens / best[label]:.1f} | {best[plain] / best[label]:.2f}x | {kept} | {per_row} | "
               f"{same} |")


# Cycles the bundled model was trained on: once it has seen one turn, it goes on repeating it.
CYCLES = ("monday tuesday wednesday thursday friday saturday sunday",
          "january february march april may june july august september october november december",
          "a b c d e f g h i j k l m n o p q r s t u v w x y z")


def _passages(text_ckpt: str, prompts: int, min_words: int = 40) -> list[str]:
    """A held-out paragraph, a blank line and its first words (text_model); or, for a checkpoint without held-out
    text (the bundled model), a cycle it knows, once and a bit."""
    heldout = Path(text_ckpt, "heldout.txt")
    if not heldout.exists():
        return [f"{cycle} {' '.join(cycle.split()[:2])}" for cycle in CYCLES][:prompts]
    lines = heldout.read_text().splitlines()
    chosen = [line for line in lines if len(line.split()) >= min_words][:prompts]
    return [f"{line}\n\n{' '.join(line.split()[:6])}" for line in chosen]


def prompt_lookup(text_ckpt: str, prompts: int, max_tokens: int, num_tokens: int, ngram_max: int, ngram_min: int,
                  dtype: str, repeats: int) -> None:
    llm = Llama.build(text_ckpt, max_seq_len=1024, max_batch_size=1, dtype=dtype, compile=False)
    ids = [llm.tokenizer.encode(p, bos=True, eos=False)[-700:] for p in _passages(text_ckpt, prompts)]
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    config = SpeculativeConfig(num_tokens=num_tokens, ngram_max=ngram_max, ngram_min=ngram_min)
    cases = {"no speculation": None, f"prompt lookup, k={num_tokens}, n={ngram_max}..{ngram_min}": config}
    engines = {label: LLMEngine(llm.model, llm.tokenizer, llm.dist.device, llm.dist.is_main,
                                EngineConfig(max_num_seqs=1, speculative=spec)) for label, spec in cases.items()}
    best, outputs = _race(engines, ids, greedy, repeats)
    what = ("a held-out paragraph, then its first words again" if Path(text_ckpt, "heldout.txt").exists()
            else "a cycle the model knows, once and a bit")
    print0(f"\n2. Prompt lookup on a copy-heavy task: {text_ckpt}, {llm.dist.world_size} rank(s), {dtype}, batch 1, "
           f"{len(ids)} prompts ({what}), {max_tokens} tokens each, greedy; best of {repeats}")
    _table(engines, best, outputs, len(ids) * max_tokens)


def run(ckpt_dir: str = "bench_out/llama32_1b_shape", text_ckpt: str = "bench_out/text_model",
        dtype: str = "bfloat16", context: int = 256, ks: str = "1,2,4,8", repeats: int = 5, prompts: int = 8,
        max_tokens: int = 128, num_speculative_tokens: int = 4, ngram_max: int = 4, ngram_min: int = 2,
        text_dtype: str = "float32", draft_quantize: str = "int4", draft_tokens: int = 3, prompt_len: int = 64,
        kernel_choice: str | None = None, only: str | None = None) -> None:
    """ks: the guesses per verify row to time; text_ckpt: a trained model with a heldout.txt (skipped if absent);
    only: "verify", "lookup" or "draft" to run one table."""
    ks_list = [int(k) for k in str(ks).split(",")] if not isinstance(ks, (tuple, list)) else [int(k) for k in ks]
    if only in (None, "verify"):
        verify_cost(ckpt_dir, dtype, context, ks_list, repeats, kernel_choice)
    if only in (None, "draft"):
        self_draft(ckpt_dir, dtype, prompt_len, max_tokens, draft_tokens, draft_quantize, max(1, repeats // 2),
                   kernel_choice)
    if only not in (None, "lookup"):
        return
    if Path(text_ckpt, "params.json").exists():
        prompt_lookup(text_ckpt, prompts, max_tokens, num_speculative_tokens, ngram_max, ngram_min, text_dtype,
                      max(1, repeats // 2))
    else:
        print0(f"\n2. skipped: no trained model at {text_ckpt} (python checkpoints/make_text_model.py --out {text_ckpt},"
               " or --text_ckpt checkpoints/tiny)")
