"""The engine's limits (`EngineConfig`, the same flags for generate, chat, serve and bench) and the KV pool size
they give on each rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_dist.dist.groups import all_reduce_min
from llama_dist.engine.speculative import SpeculativeConfig
from llama_dist.errors import ConfigError
from llama_dist.model.attention import KVCache
from llama_dist.model.llama import Transformer

# A step's token budget by default: enough that a decode batch never waits on it, small enough that a prefill
# chunk does not hold the running streams up for long (CPU and GPU alike: `--max_num_batched_tokens`).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
DEFAULT_BLOCK_SIZE = 16  # tokens per KV cache block

@dataclass
class EngineConfig:
    """The engine's limits (the same flags for generate, chat, serve and bench).

    max_num_seqs: sequences running at once (None: the model's max_batch_size, which sizes compiled shapes);
    max_num_batched_tokens: a step's token budget (decodes first, then prefill chunks); block_size: tokens per KV
    block; kv_cache_tokens: each rank's pool (None: max_batch_size x max_seq_len, the memory the model was sized
    for); gpu_memory_fraction: instead, the share of the GPU's memory the weights and the pool may take (CUDA only);
    prefix_caching: reuse the cached blocks of earlier prompts; speculative: guess tokens ahead and verify them in
    one step (`engine.speculative`), or None."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_tokens: int | None = None
    gpu_memory_fraction: float | None = None
    prefix_caching: bool = True
    speculative: SpeculativeConfig | None = None

    def check(self) -> None:
        if self.speculative is not None:
            self.speculative.check()
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        fraction = self.gpu_memory_fraction
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction <= 1):
            raise ConfigError(f"gpu_memory_fraction must be in (0, 1], got {fraction!r}")
        if fraction is not None and self.kv_cache_tokens is not None:
            raise ConfigError("give kv_cache_tokens or gpu_memory_fraction, not both")


def pool_tokens(model: Transformer, config: EngineConfig, device: torch.device) -> int:
    """Tokens each rank's KV pool holds: kv_cache_tokens, or what gpu_memory_fraction of the GPU leaves after the
    weights (the smallest over the ranks, so that every rank's pool has the same blocks), or by default
    max_batch_size x max_seq_len."""
    if config.gpu_memory_fraction is None:
        return model.max_batch_size * model.max_seq_len if config.kv_cache_tokens is None else config.kv_cache_tokens
    if torch.device(device).type != "cuda":
        raise ConfigError("gpu_memory_fraction sizes the KV cache on GPUs; on a CPU give kv_cache_tokens")
    free, total = torch.cuda.mem_get_info(device)
    old = model.cache.nbytes if model.cache is not None else 0  # the default cache goes before the pool comes
    attention = model.layers[0].attention  # keys and values of this rank's KV heads, every layer
    per_token = 2 * model.args.n_layers * attention.n_local_kv_heads * attention.head_dim
    per_token *= model.tok_embeddings.weight.dtype.itemsize
    budget = torch.tensor([config.gpu_memory_fraction * total - (total - free - old)], device=device)
    all_reduce_min(budget)
    tokens = int(budget.item() // per_token)
    if tokens < config.block_size:
        raise ConfigError(f"gpu_memory_fraction={config.gpu_memory_fraction} leaves no room for the KV cache")
    return tokens


def pooled_cache(model: Transformer, num_blocks: int, block_size: int) -> KVCache:
    """The model's cache, made a pool of `num_blocks` blocks of `block_size` unless it is one already (the old
    pool goes before the new one is allocated)."""
    cache = model.cache
    if cache is None or (cache.num_blocks, cache.block_size) != (num_blocks, block_size):
        model.cache = None
        model.cache = model.new_cache(num_blocks, block_size)
    return model.cache
