"""The decode step, eager or compiled: one new token for each sequence of the batch, each at its own position.

The engine's ModelRunner decodes through it when a step is decodes only. Eager, it runs the batch's rows over the
cache positions in use so far (the CPU path: fastest there). Compiled (the default on CUDA), it runs a few fixed
batch sizes (buckets: powers of two up to max_batch_size, and max_batch_size), the rows padded up to the next
bucket, each over max_seq_len positions of their block tables with a position mask, so its shapes never change
between steps: it is traced once per bucket, its collectives are functional ones inside the graph (`parallel`), and
on CUDA each bucket's step is captured as a CUDA graph (`mode="reduce-overhead"`, only where the collectives are
NCCL's) and replayed. Small batches then do not pay for max_batch_size rows.
"""

from __future__ import annotations

import time

import torch

from llama_dist.dist.groups import cuda_collectives_on_nccl, print0
from llama_dist.model.llama import Transformer


def default_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes a compiled step is traced for: 1, 2, 4, ... below max_batch_size, and max_batch_size."""
    return tuple(sorted({1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size}
                        | {max_batch_size}))


def compiles_by_default(device: torch.device) -> bool:
    """Compile on CUDA (launch overhead dominates an eager decode step there); on CPU eager decode is faster (the
    compiled step attends over the whole cache and every slot: docs/performance.md)."""
    return torch.device(device).type == "cuda"


class DecodeStep:
    """`step(tokens, positions, length, slots)`: next-token logits of cache slots 0..bsz-1 (or `slots`).

    tokens, positions: (bsz,) tensors: row i's newest token and the position it goes to. length: the rows attend
    over cache positions [0, length) (eager only; every position must be below it). slots: a (bsz,) tensor of
    distinct cache slots (the server's running requests). Returns float32 logits (bsz, vocab) on rank 0; None on
    the other ranks when eager (compiled, they get them too and ignore them).
    """

    def __init__(self, model: Transformer, compile: bool | None = None, buckets: tuple[int, ...] | None = None):
        self.model = model
        device = model.tok_embeddings.weight.device
        self.compiled = compiles_by_default(device) if compile is None else bool(compile)
        self.buckets = default_buckets(self.batch_size) if buckets is None else tuple(sorted(set(buckets)))
        if not self.buckets or self.buckets[0] < 1 or self.buckets[-1] != self.batch_size:
            raise ValueError(f"decode buckets must be positive and end at max_batch_size={self.batch_size}, "
                             f"got {self.buckets}")
        self.compile_s: dict[int, float] = {}  # bucket -> seconds its first call took (the compile)
        # CUDA graphs replay kernels without the host: a gloo collective (ranks sharing a GPU) cannot be in one.
        self._cuda_graphs = device.type == "cuda" and cuda_collectives_on_nccl()
        if self.compiled:
            # fullgraph: a graph break would silently fall back to slow eager pieces; dynamic=False: every shape is
            # fixed by the model's max_batch_size and max_seq_len.
            mode = "reduce-overhead" if self._cuda_graphs else None
            # One trace per bucket (and room for a re-trace or two): dynamo's default limit is 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.buckets) + 2)
            self._compiled = torch.compile(self._every_row, fullgraph=True, dynamic=False, mode=mode)

    @property
    def batch_size(self) -> int:
        """The rows every compiled step decodes."""
        return self.model.max_batch_size

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket that holds `rows` rows."""
        return next(b for b in self.buckets if b >= rows)

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def _every_row(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, positions, gather="all", tables=tables)

    def __call__(self, tokens, positions, length: int | None = None, slots: torch.Tensor | None = None,
                 tables: torch.Tensor | None = None):
        """tables: the rows' block tables in the model's cache (the engine's paged rows); None: Meta's rows, one
        after the other (row i, or slots[i])."""
        if not self.compiled:
            return self.model.decode(tokens, positions, length, slots=slots, tables=tables)
        if tables is not None:  # the caller padded its rows to a bucket (engine.model_runner)
            every_tokens, every_positions, every_tables = tokens, positions, tables
        else:
            # Meta's rows, padded to a bucket (every row of the cache when `slots` picks them). A padding row decodes
            # a dummy token at its last position, which any request writes before it reads it (a prompt fills the
            # positions before, a decode step writes its own position first).
            size = self.bucket_for(tokens.shape[0]) if slots is None else self.batch_size
            rows = torch.arange(tokens.shape[0], device=tokens.device) if slots is None else slots
            every_tokens = tokens.new_zeros(size).index_copy_(0, rows, tokens)
            every_positions = positions.new_full((size,), self.max_seq_len - 1)
            every_positions.index_copy_(0, rows, positions)
            every_tables = self.model.cache.contiguous_tables(size, self.max_seq_len, tokens.device)
        size = every_tokens.shape[0]
        if size not in self.compile_s:
            started = time.perf_counter()
            logits = self._compiled(every_tokens, every_positions, every_tables)
            self.compile_s[size] = time.perf_counter() - started
            print0(f"Compiled the decode step for {size} row(s) in {self.compile_s[size]:.1f} s")
        else:
            logits = self._compiled(every_tokens, every_positions, every_tables)
        if slots is not None:
            return logits[slots]  # a gather: a copy, safe from the next CUDA graph replay
        # A CUDA graph's output lives in memory the next replay overwrites.
        rows = logits[: tokens.shape[0]]
        return rows.clone() if self._cuda_graphs else rows
