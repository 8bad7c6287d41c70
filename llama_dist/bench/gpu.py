"""The benchmark on CUDA (`python -m llama_dist.bench run` on a GPU): timing that waits for the GPU, the device's own
copy bandwidth and peak device memory.

CUDA kernels run asynchronously: a host clock read right after a call measures the launch, not the work. Every
region timed here ends with a device synchronisation (or is timed with CUDA events).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist


def elapsed_s(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, the device's work included (a synchronisation on each side on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def device_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes per second a device-to-device copy of `nbytes` moves (read + write), best of `repeats`, timed with
    CUDA events; every rank at once, each on its own GPU."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy pays for lazy initialisation
    best = float("inf")
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """The most device memory tensors held since the last reset_peak_memory (the caching allocator's own reserve,
    and NCCL's buffers, not counted)."""
    return torch.cuda.max_memory_allocated(device) / 2**30


def generation_rates(generate, prompts, gen_len: int, warmup: int, repeats: int, device) -> tuple[float, float]:
    """(time to first token, seconds per decode step) of `generate(prompts, max_gen_len)`, from whole calls timed
    with the device's work included: best prefill-plus-first-token call, and the best full call's remainder over
    its gen_len - 1 decode steps (NaN at gen_len 1: there is none). Per-step host clocks would mislead where the
    loop does not wait for the GPU."""
    for _ in range(warmup):  # compiles the decode step and records its CUDA graph when compiling
        generate(prompts, gen_len)  # the longest first: caches sized for it serve the shorter call too
        generate(prompts, 1)
    first = min(elapsed_s(lambda: generate(prompts, 1), device) for _ in range(repeats))
    if gen_len < 2:
        return first, math.nan
    total = min(elapsed_s(lambda: generate(prompts, gen_len), device) for _ in range(repeats))
    return first, max(total - first, 1e-9) / (gen_len - 1)


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU"
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
