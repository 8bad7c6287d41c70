"""The machine's limits for decode, measured by `python -m llama_dist.bench run` in the same process as the decode
(so with the thread count it uses), on every rank at once (on one host the ranks share the memory system):

- `read_bandwidth`: bytes per second a large reduction reads (`x.sum()` over a 1 GiB float32 tensor);
- `one_row_rates`: weight bytes per second each candidate kernel streams for ONE activation row, over ~1 GiB of
  copies of one of the model's own weights (beyond the caches, as decode streams every layer's weight anew);
- `chosen_kernels`: which kernel decode runs for each weight shape at each batch size (the measured table of
  `kernel_choice`, else the static rule).

Decode of one row can go no faster than the best one-row kernel, and no kernel faster than the read bandwidth.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import time

import torch
import torch.distributed as dist

from llama_dist.model.kernels import (
    candidates,
    installed_kernel_table,
    row_bucket,
    run_kernel,
    static_kernel,
    weight_key,
)
from llama_dist.model.quant import QuantizedWeight

STREAM_BYTES = 1 << 30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _release(device: torch.device) -> None:
    """Give freed buffers back to the system: many small weight copies live on the C heap, which keeps them
    resident after they are freed (and would count in the model's memory) until trimmed."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def read_bandwidth(device: torch.device, nbytes: int = STREAM_BYTES, repeats: int = 5) -> float:
    """Bytes per second `x.sum()` reads over an `nbytes` float32 tensor, best of `repeats`; every rank at once."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()  # warm-up: the pages are touched by ones(); this builds the reduction's threads
    best = float("inf")
    for _ in range(repeats):
        _barrier()
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del x
    _release(device)
    return nbytes / best


def weight_nbytes(weight: torch.Tensor | QuantizedWeight) -> int:
    """The bytes a product with `weight` reads: a quantized weight's values and its scales (and zeros)."""
    if isinstance(weight, torch.Tensor):
        return weight.nbytes
    return sum(b.nbytes for b in weight.buffers())


def weight_names(model) -> list[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(short name, weight) of every matmul weight of `model` (`matmul_weights`): wqkv, wo, w13, w2, output."""
    module_names = {id(module): name for name, module in model.named_modules()}
    named = []
    for owner, attribute, _ in model.matmul_weights():
        name = attribute if attribute != "weight" else module_names.get(id(owner), "?").rsplit(".", 1)[-1]
        named.append((name, getattr(owner, attribute)))
    return named


def describe_key(key: tuple) -> str:
    """'out x in dtype' of a weight_key; for a quantized weight its kind (and int4 group) and the activations'
    dtype."""
    kind, out_features, in_features, dtype = key[:4]
    dtype = str(dtype).removeprefix("torch.")
    if kind == "dense":
        return f"{out_features}x{in_features} {dtype}"
    group = f" g{key[4]}" if len(key) > 4 else ""
    return f"{out_features}x{in_features} {kind}{group} ({dtype} activations)"


def chosen_kernels(model, rows: list[int]) -> list[tuple[str, str, list[str]]]:
    """[(weight names, 'out x in dtype', [kernel per row count])] for each distinct weight key of `model`: what
    `kernels.local_linear` runs for that many activation rows (the installed measured table's entry, else the
    static rule's, marked "(rule)")."""
    dtype = model.tok_embeddings.weight.dtype
    device = model.tok_embeddings.weight.device
    table = installed_kernel_table() if device.type == "cpu" else {}
    by_key: dict[tuple, tuple[list[str], torch.Tensor | QuantizedWeight]] = {}
    for name, weight in weight_names(model):
        names, _ = by_key.setdefault(weight_key(weight, dtype), ([], weight))
        if name not in names:
            names.append(name)
    out = []
    for key, (names, weight) in by_key.items():
        chosen = []
        for count in rows:
            measured = table.get((*key, row_bucket(count)))
            chosen.append(measured or f"{static_kernel(weight, device, dtype, count)} (rule)")
        out.append((", ".join(names), describe_key(key), chosen))
    return out


def format_chosen_kernels(model, rows: list[int]) -> str:
    lines = ["| weight | out x in, dtype | " + " | ".join(f"rows {r}" for r in rows) + " |",
             "|---|---|" + "---|" * len(rows)]
    for names, shape, chosen in chosen_kernels(model, rows):
        lines.append(f"| {names} | {shape} | " + " | ".join(chosen) + " |")
    return "\n".join(lines)


def _largest_layer_weight(model) -> tuple[str, torch.Tensor | QuantizedWeight]:
    """The largest per-layer matmul weight (the stacked w1/w3): a shape decode streams most of its bytes through."""
    layer_weights = [(n, w) for n, w in weight_names(model) if w is not model.output.weight]
    return max(layer_weights or weight_names(model), key=lambda item: weight_nbytes(item[1]))


def _one_row_names(weight, device: torch.device, dtype: torch.dtype) -> list[str]:
    static = static_kernel(weight, device, dtype, 1)
    if device.type == "cpu":
        names = candidates(weight_key(weight, dtype)[0], dtype, 1)
    else:  # the CPU candidates' quantized kernels are CPU ones; dense products run anywhere
        names = [static] + (["mv", "linear", "matmul_t"] if isinstance(weight, torch.Tensor) else [])
    return sorted(dict.fromkeys(names), key=lambda n: n != static)  # the static rule's first


def one_row_rates(model, nbytes: int = STREAM_BYTES, repeats: int = 3) -> tuple[str, str, int, dict[str, float]]:
    """(weight name, 'out x in dtype', copies, {kernel: weight bytes per second}) of each candidate kernel
    multiplying ONE activation row (model dtype) by each of ~`nbytes` of copies of the model's largest per-layer
    weight in turn, best pass of `repeats`; every rank at once, each on its own slice's shape (rates per rank)."""
    dtype = model.tok_embeddings.weight.dtype
    device = model.tok_embeddings.weight.device
    name, weight = _largest_layer_weight(model)
    size = weight_nbytes(weight)
    # clone, not deepcopy, for a tensor: a view would bring its whole storage along.
    dense = isinstance(weight, torch.Tensor)
    copies = [weight] + [weight.detach().clone() if dense else copy.deepcopy(weight)
                         for _ in range(max(1, nbytes // size) - 1)]
    in_features = weight.shape[1] if isinstance(weight, torch.Tensor) else weight.in_features
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    rates = {}
    with torch.inference_mode():
        for kernel in _one_row_names(weight, device, dtype):
            run_kernel(kernel, x, copies[0], 1)  # warm-up: oneDNN builds its primitive on the first call
            best = float("inf")
            for _ in range(repeats):
                _barrier()
                _sync(device)
                start = time.perf_counter()
                for w in copies:
                    run_kernel(kernel, x, w, 1)
                _sync(device)
                best = min(best, time.perf_counter() - start)
            rates[kernel] = size * len(copies) / best
    del copies
    _release(device)
    return name, describe_key(weight_key(weight, dtype)), max(1, nbytes // size), rates
