"""How much memory a rank's slice of a model needs, checked against what its device has before anything is
allocated: a size that cannot fit is one named error, not an out-of-memory kill halfway through loading."""

from __future__ import annotations

import math

import torch

from llama_dist.config import ModelArgs
from llama_dist.dist.launch_env import local_world_size
from llama_dist.errors import ConfigError
from llama_dist.model.quant import QuantScheme
from llama_dist.model.weights import KV_HEADS, REPLICATED, WeightSpec, layer_weights, top_weights

GIB = 1024**3


def _matmul_bytes_per_weight(scheme: QuantScheme | None, dtype: torch.dtype) -> float:
    if scheme is None:
        return dtype.itemsize
    if scheme.mode == "int8":
        return 1.0  # + one scale per row: negligible
    return 0.5 + 2 * dtype.itemsize / scheme.group_size  # packed 4-bit values + a scale and zero (model dtype) per group


def _local_elements(spec: WeightSpec, args: ModelArgs, world_size: int) -> int:
    """Elements of the weight `spec` one of `world_size` ranks holds."""
    elements = math.prod(spec.shape)
    if spec.split == REPLICATED:
        return elements
    if spec.split == KV_HEADS:  # KV heads are replicated when ranks outnumber them
        return elements // args.n_kv_heads * max(1, args.n_kv_heads // world_size)
    return elements // world_size


def memory_needed(
    args: ModelArgs, world_size: int, dtype: torch.dtype, scheme: QuantScheme | None = None, *,
    max_batch_size: int, max_seq_len: int,
) -> tuple[int, int]:
    """(weights, KV cache + RoPE tables) bytes one of `world_size` ranks allocates for `args` in `dtype`, with
    its matmul weights quantized by `scheme`, its cache and tables sized by the run's limits."""
    # Counted from the inventory's shapes rather than by building the model, one block standing for all: a config
    # with absurd sizes must be refused at once, not after building a million layers on the meta device.
    matmul = _matmul_bytes_per_weight(scheme, dtype)

    def nbytes(specs) -> float:
        return sum(_local_elements(spec, args, world_size)
                   * (matmul if spec.matmul and scheme is not None and scheme.covers(spec.name) else dtype.itemsize)
                   for spec in specs)

    weights = nbytes(top_weights(args)) + args.n_layers * nbytes(layer_weights(args))
    local_kv_heads = max(1, args.n_kv_heads // world_size)
    hd = args.head_dim
    cache = 2 * args.n_layers * max_batch_size * max_seq_len * local_kv_heads * hd * dtype.itemsize
    rope = 2 * max_seq_len * hd * 4  # cos and sin tables, float32
    return int(weights), cache + rope


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes this rank can still allocate on `device`, what that is), or None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} has {free / GIB:.1f} GiB free"
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as info:
                fields = dict(line.split(":", 1) for line in info)
            available = int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
        ranks = local_world_size()  # the ranks of this host share its memory
        share = available // ranks
        where = "this host has" if ranks == 1 else f"each of this host's {ranks} ranks has"
        return share, f"{where} {share / GIB:.1f} GiB available"
    return None


def check_fits_in_memory(
    args: ModelArgs, world_size: int, device: torch.device, dtype: torch.dtype, config_path,
    scheme: QuantScheme | None = None, *, max_batch_size: int, max_seq_len: int,
) -> None:
    """Refuse, before allocating anything, a model slice and KV cache larger than what `device` has free."""
    available = available_memory(device)
    if available is None:
        return
    free, where = available
    weights, cache = memory_needed(args, world_size, dtype, scheme, max_batch_size=max_batch_size,
                                   max_seq_len=max_seq_len)
    if weights + cache <= free:
        return
    dtype_name = str(dtype).removeprefix("torch.") + (f", {scheme.mode} matmul weights" if scheme else "")
    if weights > free:
        cause = f"the weights alone ({weights / GIB:.1f} GiB in {dtype_name}, shapes from {config_path}) do not fit"
        advice = "run on more ranks, a smaller dtype or --quantize"
    else:
        cause = f"{weights / GIB:.1f} GiB of weights fit, the KV cache does not"
        advice = "lower max_seq_len or max_batch_size"
    raise ConfigError(
        f"this rank needs {(weights + cache) / GIB:.1f} GiB ({weights / GIB:.1f} GiB of weights + {cache / GIB:.1f} GiB "
        f"of KV cache for max_batch_size={max_batch_size} x max_seq_len={max_seq_len}) but {where}: "
        f"{cause}; {advice}"
    )
