"""How much memory a rank's slice of a model needs, checked against what its device has before anything is
allocated: a size that cannot fit is one named error, not an out-of-memory kill halfway through loading."""

from __future__ import annotations

import dataclasses
import math

import torch

from llama_dist.config import ModelArgs
from llama_dist.dist.launch_env import local_world_size
from llama_dist.errors import ConfigError
from llama_dist.model.quant import QuantScheme, packs_int4
from llama_dist.model.weights import COLUMN, KV_HEADS, REPLICATED, WeightSpec, layer_weights, top_weights

GIB = 1024**3


# Weights one quantized stack holds (the loader quantizes wq/wk/wv as one, w1/w3 as one): its rows are theirs.
_STACKS = {"attention.wq.weight": "wqkv", "attention.wk.weight": "wqkv", "attention.wv.weight": "wqkv",
           "feed_forward.w1.weight": "w13", "feed_forward.w3.weight": "w13"}


def _local_shape(spec: WeightSpec, args: ModelArgs, world_size: int) -> tuple[int, ...]:
    """The shape of the slice of weight `spec` one of `world_size` ranks holds."""
    shape = list(spec.shape)
    if spec.split == REPLICATED:
        return tuple(shape)
    if spec.split == KV_HEADS:  # KV heads are replicated when ranks outnumber them
        shape[0] = shape[0] // args.n_kv_heads * max(1, args.n_kv_heads // world_size)
    else:
        shape[spec.split_dim] //= world_size
    return tuple(shape)


def quantized_nbytes(scheme: QuantScheme, rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of a (rows, columns) weight quantized by `scheme` as it is stored on `device` for `dtype`
    activations (model.quant): int8, a byte a value and a scale (model dtype) a row; int4, its columns padded to
    whole groups, half a byte a value where packed (`packs_int4`) and a byte where not, and a scale and a zero
    (model dtype) a row and group."""
    if scheme.mode == "int8":
        return rows * columns + rows * dtype.itemsize
    groups = -(-columns // scheme.group_size)
    values = rows * groups * scheme.group_size
    packed = packs_int4(device, rows, dtype)
    return (values // 2 if packed else values) + 2 * rows * groups * dtype.itemsize


def memory_needed(
    args: ModelArgs, world_size: int, dtype: torch.dtype, scheme: QuantScheme | None = None, *,
    max_batch_size: int, max_seq_len: int, device: torch.device | str = "cpu",
) -> tuple[int, int]:
    """(weights, KV cache + RoPE tables) bytes one of `world_size` ranks allocates on `device` for `args` in
    `dtype`, with its matmul weights quantized by `scheme` as they are stored there, its cache and tables sized by
    the run's limits."""
    # Counted from the inventory's shapes rather than by building the model, one block standing for all: a config
    # with absurd sizes must be refused at once, not after building a million layers on the meta device.
    device = torch.device(device)

    def nbytes(specs) -> int:
        total, stacks = 0, {}
        for spec in specs:
            shape = _local_shape(spec, args, world_size)
            if spec.matmul and scheme is not None and scheme.covers(spec.name):
                rows, columns = stacks.get(_STACKS.get(spec.name, spec.name), (0, shape[1]))
                stacks[_STACKS.get(spec.name, spec.name)] = (rows + shape[0], columns)
            else:
                total += math.prod(shape) * dtype.itemsize
        return total + sum(quantized_nbytes(scheme, rows, columns, dtype, device) for rows, columns in stacks.values())

    tops = top_weights(args)
    if args.tie_word_embeddings and scheme is not None and scheme.covers("output.weight"):
        # A quantized output is its own weight, quantized from the embedding it is tied to.
        tops.append(dataclasses.replace(tops[0], name="output.weight", split=COLUMN, matmul=True))
    weights = nbytes(tops) + args.n_layers * nbytes(layer_weights(args))
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
                                   max_seq_len=max_seq_len, device=device)
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
