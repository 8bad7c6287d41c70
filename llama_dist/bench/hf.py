"""transformers' `generate` on the benchmark's weights and device, the reference `bench run --compare_hf` measures
against: its default generate, and (--hf_compile) its static KV cache + torch.compile mode."""

from __future__ import annotations

import math

import torch

from llama_dist.bench.gpu import elapsed_s
from llama_dist.dist.groups import print0
from llama_dist.errors import one_line
from llama_dist.model.weights import weight_shapes


def _hf_model(checkpoint, dtype):
    """The checkpoint's weights (any format, any shard count) in transformers' LlamaForCausalLM."""
    from llama_dist.checkpoint.convert import FullTensors, transformers_model

    weights = FullTensors(checkpoint.reader, weight_shapes(checkpoint.args))
    return transformers_model(weights, checkpoint.args, dtype=dtype)


def _hf_rates(model, prompt: torch.Tensor, gen_len: int, repeats: int, compiled: bool = False) -> tuple[float, float]:
    """transformers' greedy generate: (best time to first token, best decode tokens/s), the device's work included."""
    # An explicit mask: transformers would otherwise mask every prompt token equal to pad_token_id.
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(prompt))

    def generate(new_tokens: int):
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)

    first, total = float("inf"), float("inf")
    with torch.inference_mode():
        # Compiled: the longest call first, so that the static cache is made once at the size every call fits in
        # (transformers keeps the largest): one compile; its CUDA graphs are recorded in the next calls.
        for new_tokens in [gen_len, 1] * 2 if compiled else [2]:
            generate(new_tokens)
        for _ in range(repeats):
            first = min(first, elapsed_s(lambda: generate(1), prompt.device))
            if gen_len > 1:
                total = min(total, elapsed_s(lambda: generate(gen_len), prompt.device))
    if gen_len < 2:
        return first, math.nan  # no decode step to time
    return first, prompt.shape[0] * (gen_len - 1) / max(total - first, 1e-9)


def compile_static(model) -> None:
    """transformers' fast generation recipe: a static KV cache and the forward compiled with CUDA graphs, once.

    Since CompileConfig exists (4.47), generate compiles a static-cache decoding forward itself: wrapping
    `model.forward` in torch.compile too compiled it twice (and the prefill's shapes with it), so it is only told
    how; an older transformers gets the forward compiled here."""
    torch._dynamo.reset()  # drop our decode step's compiled graphs (and their CUDA graph memory) first
    model.generation_config.cache_implementation = "static"
    try:
        from transformers import CompileConfig
    except ImportError:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        return
    model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")


def compare_with_transformers(checkpoint, torch_dtype, device, ours: dict, prompt_len: int, gen_len: int,
                              repeats: int, hf_compile: bool) -> None:
    """Rows for transformers on the same weights and device: its default generate, and with hf_compile its static
    cache + torch.compile mode (a row saying why where that fails). ours: batch -> (prompts, our decode tok/s)."""
    print0("\n| transformers | batch | TTFT s | prefill tok/s | decode tok/s | ours / HF decode |")
    print0("|---|---|---|---|---|---|")
    hf = _hf_model(checkpoint, torch_dtype).to(device)
    for label, compiled in [("HF generate", False)] + ([("HF static cache + compile", True)] if hf_compile else []):
        if compiled:
            compile_static(hf)
        for batch, (prompts, our_rate) in ours.items():
            try:
                hf_first, hf_rate = _hf_rates(hf, torch.tensor(prompts, device=device), gen_len, repeats, compiled)
            except Exception as exc:  # noqa: BLE001 - a reference that does not run is reported, not fatal
                print0(f"| {label} | {batch} | failed: {type(exc).__name__}: {one_line(exc, first=True)[:200]} | | | |")
                break
            decode = "-" if math.isnan(hf_rate) else f"{hf_rate:.1f}"
            ratio = "-" if math.isnan(hf_rate) or math.isnan(our_rate) else f"{our_rate / hf_rate:.2f}x"
            print0(f"| {label} | {batch} | {hf_first:.3f} | {batch * prompt_len / hf_first:.0f} | {decode} | {ratio} |")
