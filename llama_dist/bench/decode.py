"""Decode benchmarks: `python -m llama_dist.bench run|make-checkpoint|quality|kernels ...` (under torchrun for N
ranks).

`run` prints one table row per batch size: load time, time to first token, prefill and decode tokens/s, the
bytes a decode step reads per rank (weights and the rows' KV cache: `traffic`), achieved bandwidth against the
machine's copy bandwidth, its read
bandwidth and the fastest one-row kernel's streaming rate (all measured in the same run, on every rank at once:
`bench.machine`), and peak resident memory per rank; before it, the kernel each weight shape runs at each batch
size. With --compare_hf (one rank only) the same weights run through transformers' `generate` for a speed ratio. On
a GPU it times whole calls with the GPU's work included, measures the GPU's own copy bandwidth and adds peak device
memory (`bench_gpu`); --hf_compile adds transformers' static cache + torch.compile mode.
`quality` compares each weight quantization with the float model on held-out text (top-1 agreement, perplexity);
`kernels` times the matmul kernels of one rank's weight.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_dist.bench.gpu import (
    describe_device,
    device_copy_bandwidth,
    generation_rates,
    peak_memory_gib,
    reset_peak_memory,
)
from llama_dist.bench.hf import compare_with_transformers
from llama_dist.bench.machine import format_chosen_kernels, one_row_rates, read_bandwidth
from llama_dist.bench.traffic import kv_bytes_per_decode_step, kv_bytes_per_token, weight_bytes_per_step
from llama_dist.checkpoint.consolidated import write_consolidated
from llama_dist.checkpoint.formats import find_tokenizer
from llama_dist.checkpoint.loader import load_model, open_checkpoint
from llama_dist.checkpoint.progress import Progress, human_size
from llama_dist.config import ModelArgs, resolve_dtype
from llama_dist.dist.groups import init_distributed, print0
from llama_dist.errors import ConfigError
from llama_dist.llm import Llama
from llama_dist.model.kernel_choice import choose_kernels, resolve_mode
from llama_dist.model.kernels import local_linear
from llama_dist.model.native import int8_rows_available
from llama_dist.model.quant import DEFAULT_INT4_GROUP_SIZE, Int4Weight, Int8Weight, QuantScheme, make_scheme
from llama_dist.model.weights import random_weights, weight_shapes
from llama_dist.text.tokenizer import TokenizerInterface, load_tokenizer

# The reference workload of the performance issue: shaped like Llama-3.2-1B (untied output), random weights.
LLAMA_32_1B_SHAPE = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                         ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
LLAMA_3_8B_SHAPE = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=False)
SHAPES = {"llama32_1b": LLAMA_32_1B_SHAPE, "llama3_8b": LLAMA_3_8B_SHAPE}


class TokenIdsOnly(TokenizerInterface):
    """Benchmarks feed token ids directly; nothing stops early, so every step is measured."""

    family = "none"

    def __init__(self, vocab_size: int):
        self._bos, self._eos, self._pad, self._n_words, self._stop = 0, -2, -1, vocab_size, []
        self.special_tokens = {}

    def decode(self, ids) -> str:
        return ""


def make_checkpoint(out: str | None = None, shape: str = "llama32_1b", dtype: str = "bfloat16", seed: int = 0,
                    device: str = "cpu", **overrides) -> None:
    """Write random weights in Meta's layout to `out` (default bench_out/SHAPE_shape), shaped like Llama-3.2-1B
    (--shape llama32_1b, ~1.5B parameters) or Llama-3-8B (--shape llama3_8b, ~8.0B); `overrides` change params.json
    fields for a smaller model (e.g. --dim 512 --n_layers 2 --vocab_size 8192). device: where the random values are
    drawn (--device cuda: seconds instead of minutes for the 8B shape)."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    unknown = sorted(set(overrides) - set(SHAPES[shape]))
    if unknown:
        raise ConfigError(f"unknown shape field(s) {unknown}; known: {sorted(SHAPES[shape])}")
    out = out or f"bench_out/{shape}_shape"
    args = ModelArgs(**{**SHAPES[shape], **overrides})
    dtype = resolve_dtype(dtype, torch.device("cpu"))
    progress = Progress(f"Drawing {shape}", sum(map(math.prod, weight_shapes(args).values())) * dtype.itemsize,
                        "Drew {count} tensors ({size}) in {seconds:.1f} s")
    weights = random_weights(args, seed=seed, dtype=dtype, device=device, on_tensor=progress.advance)
    progress.done()
    params = {k: v for k, v in dataclasses.asdict(args).items() if k in SHAPES[shape]}
    write_consolidated(weights, params, out)
    total = sum(w.numel() for w in weights.values())
    print(f"wrote {out}: {total / 1e9:.2f}B parameters, {human_size(sum(w.nbytes for w in weights.values()))}")


def listed(value, convert=int) -> list:
    """A comma-separated flag as a list: fire turns "1,8,32" into a tuple and "1" into an int."""
    return [convert(v) for v in (str(value).split(",") if isinstance(value, (str, int)) else value)]


def _scheme_name(scheme: QuantScheme | None) -> str:
    if scheme is None:
        return "as stored"
    group = f" g{scheme.group_size}" if scheme.group_size else ""
    return f"{scheme.mode}{group}" + ("" if scheme.quantize_output else " (output kept)")


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes per second moved by a large tensor copy (read + write), best of `repeats`; every rank at once."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def _reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux), so the copy-bandwidth buffers do not count as the model's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _share(value: float, limit: float) -> str:
    return "-" if math.isnan(limit) or math.isnan(value) else f"{value / limit:.0%}"


def _number(value: float, spec: str) -> str:
    """`value` formatted, or "-" for a figure not measured (NaN: no decode step at gen_len 1)."""
    return "-" if math.isnan(value) else format(value, spec)


def _gather_floats(value: float) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value]))
    return [t.item() for t in out]


def _one_row_limit(model) -> tuple[float, str]:
    """(bytes/s of the fastest one-row kernel, all ranks at once, a line saying what was measured)."""
    name, shape, copies, rates = one_row_rates(model)
    total = {kernel: sum(_gather_floats(rate)) for kernel, rate in rates.items()}  # every rank runs each in turn
    best = max(total, key=total.get)
    each = ", ".join(f"{kernel} {rate / 1e9:.1f}" for kernel, rate in total.items())
    return total[best], (f"one-row kernel {total[best] / 1e9:.1f} GB/s ({best}; {name} {shape} x {copies} copies "
                         f"a rank, GB/s of weight bytes, all ranks: {each})")


def run(
    ckpt_dir: str = "bench_out/llama32_1b_shape",
    dtype: str = "bfloat16",
    batch_sizes: str | int | tuple = "1,8,32",
    prompt_len: int = 64,
    gen_len: int = 32,
    compare_hf: bool = False,
    warmup: int = 1,
    repeats: int = 5,
    quantize: str | None = None,
    int4_group_size: int = DEFAULT_INT4_GROUP_SIZE,
    keep_output_precision: bool = False,
    compile: bool | None = None,
    hf_compile: bool = False,
    kernel_choice: str | None = None,
    machine_limits: bool = True,
) -> None:
    """Benchmark greedy generation on `ckpt_dir` at each batch size; run under torchrun for N ranks.

    ckpt_dir: a checkpoint, or random:NAME for a model preset's random weights drawn on the device, no files (e.g.
    random:Llama-3-8B: `checkpoint.random_reader`). gen_len: tokens per sequence (1: time to first token only).

    quantize / int4_group_size / keep_output_precision: as for every llama-dist command (weight-only int8 / int4,
    quantized by each rank at load; the load time includes it). compile: decode through the compiled step (None:
    on CUDA only, as Llama.build). hf_compile: with --compare_hf, also transformers' static cache + torch.compile
    mode (CUDA graphs: meant for a GPU). kernel_choice: measure or static, as for every llama-dist command (None:
    $LLAMA_DIST_KERNEL_CHOICE, else measure); the load time excludes the measuring, which prints its own line.
    machine_limits: measure the read bandwidth and the fastest one-row kernel's rate (1 GiB each, a few seconds;
    --nomachine_limits for a quick run: their columns show "-")."""
    scheme = make_scheme(quantize, int4_group_size, keep_output_precision)
    kernel_choice = resolve_mode(kernel_choice)
    sizes = listed(batch_sizes)
    ctx = init_distributed()
    device, on_gpu = ctx.device, ctx.device.type == "cuda"
    torch_dtype = resolve_dtype(dtype, device)
    # Bandwidth first: its 1 GiB buffers are freed before the model's peak memory is tracked. All ranks at once: on
    # CPU they share the machine's memory system, on GPUs each adds its own.
    bandwidth = sum(_gather_floats(device_copy_bandwidth(device) if on_gpu else copy_bandwidth()))
    read_bw = sum(_gather_floats(read_bandwidth(device))) if machine_limits else math.nan
    _reset_peak_rss()
    reset_peak_memory(device)
    start = time.perf_counter()
    checkpoint = open_checkpoint(ckpt_dir, max_seq_len=prompt_len + gen_len, max_batch_size=max(sizes))
    model = load_model(checkpoint, device=device, dtype=torch_dtype, quantize=scheme)
    if on_gpu:
        torch.cuda.synchronize(device)  # the copies to the GPU are part of the load
    load_s = time.perf_counter() - start
    choose_kernels(model, kernel_choice)
    # The one-row kernel's 1 GiB of weight copies is no part of the model's peak: keep the load's, start afresh.
    load_peak_rss, load_peak_gpu = max(_gather_floats(_status_gib("VmHWM"))), (
        max(_gather_floats(peak_memory_gib(device))) if on_gpu else 0.0)
    one_row, one_row_line = _one_row_limit(model) if machine_limits else (math.nan, "one-row kernel not measured")
    _reset_peak_rss()
    reset_peak_memory(device)
    llm = Llama(model, TokenIdsOnly(model.args.vocab_size), ctx, compile=compile)
    step_bytes, kv_per_token = weight_bytes_per_step(model), kv_bytes_per_token(model)
    where = f"{describe_device(device)}, " if on_gpu else f"{torch.get_num_threads()} threads/rank, "
    print0(
        f"\n{ckpt_dir}: {ctx.world_size} rank(s), {dtype}, weights {_scheme_name(scheme)}, {where}"
        f"load {load_s:.1f} s, copy bandwidth {bandwidth / 1e9:.1f} GB/s (all ranks), "
        f"weights streamed per step {step_bytes / 2**30:.2f} GiB/rank, KV cache read per step and row "
        f"{kv_bytes_per_decode_step(kv_per_token, 1, prompt_len, gen_len) / 2**20:.2f} MiB/rank (mean context)"
        + (", compiled decode" if llm.decode_step.compiled else "")
    )
    print0(f"Kernels decode runs per weight shape (rows = batch size; \"(rule)\": the static rule, no measured "
           f"entry):\n{format_chosen_kernels(model, sizes)}")
    read_line = "read bandwidth not measured" if math.isnan(read_bw) else (
        f"read bandwidth {read_bw / 1e9:.1f} GB/s (float32 sum over 1 GiB, all ranks)")
    print0(f"Machine limits ({where.removesuffix(', ')}, every rank at once): {read_line}; {one_row_line}\n")
    print0("| ranks | batch | TTFT s | prefill tok/s | decode tok/s | step ms | GB/s achieved | of copy BW "
           "| of read BW | of 1-row kernel | peak RSS GiB/rank | private GiB/rank |"
           + (" peak CUDA GiB/rank |" if on_gpu else ""))
    print0("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if on_gpu else ""))
    gen = torch.Generator().manual_seed(0)
    ours = {}
    for batch in sizes:
        prompts = torch.randint(0, model.args.vocab_size, (batch, prompt_len), generator=gen).tolist()
        if on_gpu:  # whole calls, synchronised: the decode loop itself does not wait for the GPU every step
            prefill_s, step_s = generation_rates(lambda p, n: llm.generate(p, n, temperature=0), prompts, gen_len,
                                                 warmup, repeats, device)
        else:
            for _ in range(warmup):
                llm.generate(prompts, 4, temperature=0)
            runs = []
            for _ in range(repeats):  # a shared machine's bandwidth wanders: best run, as for the copy bandwidth
                llm.generate(prompts, gen_len, temperature=0)
                runs.append(llm.last_stats)
            stats = min(runs, key=lambda s: s.decode_s / max(s.decode_steps, 1))
            prefill_s = stats.prefill_s
            step_s = stats.decode_s / stats.decode_steps if stats.decode_steps else math.nan
        kv_bytes = kv_bytes_per_decode_step(kv_per_token, batch, prompt_len, gen_len)
        achieved = ctx.world_size * (step_bytes + kv_bytes) / step_s
        peak = max(load_peak_rss, *_gather_floats(_status_gib("VmHWM")))
        # Private: what this rank owns (weights, caches, activations), not the page cache of mapped files.
        private = max(_gather_floats(_status_gib("RssAnon")))
        gpu_peak = f" {max(load_peak_gpu, *_gather_floats(peak_memory_gib(device))):.2f} |" if on_gpu else ""
        print0(
            f"| {ctx.world_size} | {batch} | {prefill_s:.3f} | {batch * prompt_len / prefill_s:.0f} | "
            f"{_number(batch / step_s, '.1f')} | {_number(step_s * 1e3, '.1f')} | {_number(achieved / 1e9, '.1f')} | "
            f"{_share(achieved, bandwidth)} | "
            f"{_share(achieved, read_bw)} | {_share(achieved, one_row)} | {peak:.2f} | "
            f"{private:.2f} |{gpu_peak}"
        )
        ours[batch] = (prompts, batch / step_s)
    if compare_hf and ctx.world_size == 1:  # after our rows, so HF's copy of the weights is not in our peak memory
        del llm, model
        if on_gpu:
            torch.cuda.empty_cache()
        compare_with_transformers(checkpoint, torch_dtype, device, ours, prompt_len, gen_len, repeats, hf_compile)


def _held_out_windows(tokenizer, text_file: str | None, seq_len: int, tokens: int, seed: int) -> torch.Tensor:
    """(windows, seq_len) token ids, each window starting at a document's <s>, with >= `tokens` predicted
    positions in all. Documents: the lines of `text_file`, or fresh samples of the bundled model's training
    generator (checkpoints/make_tiny.py) drawn with a seed other than its training seed."""
    if text_file is not None:
        docs = [line for line in Path(text_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoints"))
        from make_tiny import synthetic_documents

        docs = synthetic_documents(4 * tokens, random.Random(seed))
    stream, starts = [], []
    for doc in docs:
        starts.append(len(stream))
        stream.extend(tokenizer.encode(doc, bos=True, eos=True))
    windows, end = [], 0
    for start in starts:
        if start >= end and start + seq_len <= len(stream):
            windows.append(stream[start : start + seq_len])
            end = start + seq_len
        if len(windows) * (seq_len - 1) >= tokens:
            return torch.tensor(windows)
    raise ConfigError(f"the text has fewer than {tokens} predicted positions in windows of {seq_len} tokens")


def quality(
    ckpt_dir: str = "checkpoints/tiny",
    tokens: int = 2048,
    seq_len: int = 128,
    dtype: str = "float32",
    group_sizes: str | int | tuple = "32,64,128",
    text_file: str | None = None,
    seed: int = 2026,
    batch_size: int = 8,
) -> None:
    """Teacher-forced quality of each quantization against the float model on held-out text: top-1 agreement
    (the quantized model's most likely next token equals the float model's) and perplexity, over `tokens`
    predicted positions."""
    sizes = listed(group_sizes)
    ctx = init_distributed()
    torch_dtype = resolve_dtype(dtype, ctx.device)
    tokenizer = load_tokenizer(find_tokenizer(ckpt_dir))
    windows = _held_out_windows(tokenizer, text_file, seq_len, tokens, seed).to(ctx.device)
    schemes = [None, make_scheme("int8"), make_scheme("int8", keep_output_precision=True)]
    schemes += [make_scheme("int4", group) for group in sizes]
    targets = windows[:, 1:]
    print0(f"\n{ckpt_dir}, {dtype}, {targets.numel()} predicted tokens in {len(windows)} windows of {seq_len}")
    print0("| weights | top-1 agreement with float | perplexity | change |\n|---|---|---|---|")
    reference = None
    for scheme in schemes:
        model = load_model(ckpt_dir, device=ctx.device, dtype=torch_dtype, quantize=scheme, max_seq_len=seq_len,
                           max_batch_size=batch_size)
        with torch.inference_mode():
            logits = torch.cat([model(chunk, 0).logits[:, :-1] for chunk in windows.split(batch_size)])
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="mean").item()
        top1 = logits.argmax(-1)
        if reference is None:
            reference = (top1, math.exp(nll))
            print0(f"| {dtype} (float) | 100% | {reference[1]:.4f} | |")
            continue
        agreement = (top1 == reference[0]).float().mean().item()
        ppl = math.exp(nll)
        print0(f"| {_scheme_name(scheme)} | {agreement:.2%} | {ppl:.4f} | {ppl / reference[1] - 1:+.2%} |")


def _seconds_per_call(kernel, weights: list, x, repeats: int) -> float:
    """Best time of one call over `repeats` passes over `weights` (copies of one weight, more bytes than the
    caches hold, so every call streams its weight from memory as decode does); a shared machine: take the best."""
    kernel(weights[0], x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for weight in weights:
            kernel(weight, x)
        best = min(best, (time.perf_counter() - start) / len(weights))
    return best


def kernels(
    shapes: str | tuple = "16384x2048,2048x8192",
    rows: str | int | tuple = "1,8,32",
    dtypes: str | tuple = "bfloat16,float32",
    repeats: int = 5,
    stream_mib: int = 768,
    dequantized: bool = False,
) -> None:
    """Micro-benchmark of the matmul kernels for one rank's weight (out x in; default: Llama-3.2-1B's stacked
    w1/w3 and its w2), per activation dtype and row count: microseconds a call and weight GB/s streamed (values +
    scales), each call on another copy of the weight (`stream_mib` MiB of copies: beyond the caches). This is
    what chose the kernels in `kernels.local_linear` (docs/performance.md). dequantized: also time the
    dequantize-then-multiply fallbacks (slow)."""
    import copy

    print(f"{torch.get_num_threads()} threads")
    print("| weight | activations | rows | kernel | us/call | GB/s |\n|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for dtype_name in listed(dtypes, str):
        dtype = resolve_dtype(dtype_name, torch.device("cpu"))
        for shape in listed(shapes, str):
            out_features, in_features = map(int, shape.split("x"))
            weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
            candidates = [
                ("dense (local_linear)", lambda: weight.to(dtype), local_linear),
                ("int8 _weight_int8pack_mm", lambda: Int8Weight.quantize(weight, dtype), Int8Weight.mm_int8pack),
            ]
            if int8_rows_available():
                candidates.append(("int8 compiled (model/csrc)", lambda: Int8Weight.quantize(weight, dtype),
                                   Int8Weight.mm_native))
            candidates += [
                ("int4 g32 _weight_int4pack_mm_for_cpu", lambda: Int4Weight.quantize(weight, 32, dtype, True),
                 Int4Weight.mm_int4pack),
                ("int4 g128 _weight_int4pack_mm_for_cpu", lambda: Int4Weight.quantize(weight, 128, dtype, True),
                 Int4Weight.mm_int4pack),
            ]
            if dequantized:
                candidates += [
                    ("int8 dequantize + mm", lambda: Int8Weight.quantize(weight, dtype), Int8Weight.mm_dequantized),
                    ("int4 g32 dequantize + mm", lambda: Int4Weight.quantize(weight, 32, dtype, False),
                     Int4Weight.mm_dequantized),
                ]
            for name, make, kernel in candidates:
                one = make()
                nbytes = one.nbytes if isinstance(one, torch.Tensor) else sum(b.nbytes for b in one.buffers())
                copies = [one] + [copy.deepcopy(one) for _ in range(max(1, stream_mib * 2**20 // nbytes) - 1)]
                for count in listed(rows):
                    x = torch.randn(count, in_features, generator=gen).to(dtype)
                    if kernel is local_linear:
                        seconds = _seconds_per_call(lambda w, v: local_linear(v, w), copies, x, repeats)
                    else:
                        seconds = _seconds_per_call(kernel, copies, x, repeats)
                    print(f"| {shape} | {dtype_name} | {count} | {name} | {seconds * 1e6:.0f} | "
                          f"{nbytes / seconds / 1e9:.1f} |", flush=True)
                del copies, one


COMMANDS = {"run": run, "make-checkpoint": make_checkpoint, "quality": quality, "kernels": kernels}
