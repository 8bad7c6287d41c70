"""Tensor-parallel building blocks: the one place that knows how each weight is split across ranks.

The layers are fairscale's (so their collectives and Megatron-style split are the well-tested ones); this
module adds what loading needs: every split layer records a `ShardSpec` saying which slice of the full,
unsplit weight this rank holds, so the loader can read exactly that slice from any checkpoint format.

Split table (Meta layout, weights are (out_features, in_features)):
  column-parallel (dim 0): attention.wq/wk/wv, feed_forward.w1/w3, output
  row-parallel    (dim 1): attention.wo, feed_forward.w2
  vocab-parallel  (dim 0): tok_embeddings
  replicated:              norms
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)

from llama_dist.dist.groups import (
    model_parallel_group,
    model_parallel_rank,
    model_parallel_world_size,
    shared_memory_allreduce,
)
from llama_dist.model.kernels import local_linear


def sum_over_ranks(partial: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's `partial`, on every rank (the all-reduce that joins row-parallel outputs)."""
    if model_parallel_world_size() == 1:
        return partial  # fairscale's autograd Function costs ~15 us a call even where it has nothing to do
    if torch.compiler.is_compiling():
        # In-place c10d collectives and the shared-memory segment break a compiled graph; functional ones are
        # traced into it (and captured by CUDA graphs).
        return funcol.all_reduce(partial, "sum", model_parallel_group())
    segment = shared_memory_allreduce()
    if segment is not None and segment.fits(partial) and not partial.requires_grad:
        return segment.all_reduce_(partial)
    return reduce_from_model_parallel_region(partial)  # gloo/NCCL; differentiable, for training


@dataclass(frozen=True)
class ShardSpec:
    """This rank's slice [start, stop) along `dim` of a full weight whose unsplit shape is `full_shape`."""

    dim: int
    start: int
    stop: int
    full_shape: tuple[int, ...]


def _keep(weight: torch.Tensor) -> torch.Tensor:
    return weight  # no initialisation: every weight is loaded from a checkpoint


@contextlib.contextmanager
def skip_weight_init():
    """Build split layers without fairscale's initialisation, for weights that are loaded next."""
    # The one patch of fairscale's layers: to initialise a rank's slice, _initialize_affine_weight builds the whole
    # unsplit weight on every rank and copies its part out (gigabytes per rank for a 70B model); its layers create
    # their weights with the legacy torch.Tensor constructor, which ignores torch.device("meta"), so building on
    # the meta device does not avoid it.
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


def local_kv_heads(n_kv_heads: int) -> tuple[int, int]:
    """(first KV head, number of KV heads) held by this rank.

    With more ranks than KV heads each rank holds the one KV head its query heads attend to, so a KV head is
    replicated on world_size / n_kv_heads ranks (config validation guarantees the ratios divide).
    """
    world, rank = model_parallel_world_size(), model_parallel_rank()
    if world <= n_kv_heads:
        per_rank = n_kv_heads // world
        return rank * per_rank, per_rank
    return rank * n_kv_heads // world, 1


def fuse_weights(*linears: torch.nn.Module) -> torch.Tensor:
    """Stack the weights of linears that share an input into one tensor; each keeps its weight as a view of it.

    One product with the stacked weight then computes all their outputs in a single pass over memory (decode
    is bound by weight streaming), while loading still fills each original weight, now a view, in place.
    """
    stacked = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = stacked[start : start + rows]
        start += rows
    return stacked


def _into_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """x for a column-parallel product: itself forward; fairscale's Function (whose backward all-reduces the
    gradient) only where a gradient is being recorded, as its Python call costs more than a small product."""
    return copy_to_model_parallel_region(x) if x.requires_grad else x


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """y = x W^T with W split by output rows; each rank returns its own slice of y."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False, gather_output=False, init_method=_keep)
        per_rank = self.output_size_per_partition
        start = model_parallel_rank() * per_rank
        self.shard = ShardSpec(0, start, start + per_rank, (out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_linear(_into_parallel_region(x), self.weight)


class KVParallelLinear(torch.nn.Module):
    """wk / wv: column-parallel by whole KV heads, replicating heads when ranks outnumber them.

    fairscale's column split gives each rank 1/N of the rows, which cannot express a head held by several ranks.
    """

    def __init__(self, in_features: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        first, count = local_kv_heads(n_kv_heads)
        self.weight = torch.nn.Parameter(torch.empty(count * head_dim, in_features))
        self.shard = ShardSpec(0, first * head_dim, (first + count) * head_dim, (n_kv_heads * head_dim, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_linear(_into_parallel_region(x), self.weight)


class RowParallelLinear(fs_layers.RowParallelLinear):
    """y = x W^T with W split by input columns; the partial sums are all-reduced, every rank gets all of y."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False, input_is_parallel=True, init_method=_keep)
        per_rank = self.input_size_per_partition
        start = model_parallel_rank() * per_rank
        self.shard = ShardSpec(1, start, start + per_rank, (out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(local_linear(x, self.weight))


class VocabParallelEmbedding(fs_layers.VocabParallelEmbedding):
    """Embedding table split by vocabulary rows; ids outside this rank's rows contribute zeros to an all-reduce."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__(vocab_size, dim, init_method=_keep)
        self.shard = ShardSpec(0, self.vocab_start_index, self.vocab_end_index, (vocab_size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Each rank looks up the ids in its rows and contributes zeros for the rest; the sum completes it.
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local = F.embedding((ids - self.vocab_start_index).masked_fill(outside, 0), self.weight)
        return sum_over_ranks(local.masked_fill(outside.unsqueeze(-1), 0.0))


def shard_specs(model: torch.nn.Module) -> dict[str, ShardSpec | None]:
    """Parameter name -> this rank's ShardSpec (None for a replicated parameter)."""
    specs: dict[str, ShardSpec | None] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            specs[full_name] = getattr(module, "shard", None) if param_name == "weight" else None
    return specs


def gather_last_dim(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's slice along the last dimension, on every rank."""
    world = model_parallel_world_size()
    if not torch.compiler.is_compiling() or world == 1:
        return gather_from_model_parallel_region(local)
    # Functional collectives gather along dim 0 (what NCCL lays out contiguously); the chunks then join last.
    gathered = _all_gather_dim0(local.contiguous(), 0, model_parallel_group())
    return torch.cat(gathered.chunk(world, dim=0), dim=-1)


# torch >= 2.12 names it all_gather_single; older releases (2.11 on the GPU image) all_gather_tensor.
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def broadcast_from_rank0(tensor: torch.Tensor) -> None:
    """Rank 0's `tensor` on every rank, in place, over the model-parallel group (the communicator the model's
    all-reduces already use: a second one over the same ranks would cost another NCCL communicator)."""
    if model_parallel_world_size() > 1:
        group = model_parallel_group()
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)


def gather_last_dim_to_rank0(local: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's slice along the last dimension on rank 0 only (others get None).

    Sampling needs the full vocabulary row on one rank only; a gather moves 1/N of an all-gather's bytes. Inside
    a compiled step every rank gets it (there is no functional gather).
    """
    world = model_parallel_world_size()
    if world == 1 or torch.compiler.is_compiling():
        return gather_last_dim(local)
    local = local.contiguous()
    group = model_parallel_group()
    if model_parallel_rank() == 0:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.gather(local, parts, dst=dist.get_global_rank(group, 0), group=group)
        return torch.cat(parts, dim=-1)
    dist.gather(local, None, dst=dist.get_global_rank(group, 0), group=group)
    return None
