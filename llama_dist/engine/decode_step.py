"""The decode step, eager or compiled: one new token for each sequence of the batch, each at its own position.

The engine's ModelRunner decodes through it when a step is decodes only. Eager, it runs the batch's rows over the
cache positions in use so far (the CPU path: fastest there). Compiled (the default on CUDA), it always runs
max_batch_size rows over max_seq_len positions of their block tables with a position mask, so its shapes never
change: it is traced once, its collectives are functional ones inside the graph (`parallel`), and on CUDA the whole
step is captured as a CUDA graph (`mode="reduce-overhead"`, only where the collectives are NCCL's) and replayed.
"""

from __future__ import annotations

import time

import torch

from llama_dist.dist.groups import cuda_collectives_on_nccl, print0
from llama_dist.model.llama import Transformer


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

    def __init__(self, model: Transformer, compile: bool | None = None):
        self.model = model
        device = model.tok_embeddings.weight.device
        self.compiled = compiles_by_default(device) if compile is None else bool(compile)
        self.compile_s: float | None = None  # measured on the first compiled call
        # CUDA graphs replay kernels without the host: a gloo collective (ranks sharing a GPU) cannot be in one.
        self._cuda_graphs = device.type == "cuda" and cuda_collectives_on_nccl()
        if self.compiled:
            # fullgraph: a graph break would silently fall back to slow eager pieces; dynamic=False: every shape is
            # fixed by the model's max_batch_size and max_seq_len.
            mode = "reduce-overhead" if self._cuda_graphs else None
            self._compiled = torch.compile(self._every_row, fullgraph=True, dynamic=False, mode=mode)

    @property
    def batch_size(self) -> int:
        """The rows every compiled step decodes."""
        return self.model.max_batch_size

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
        if tables is not None:  # the caller padded to batch_size rows (engine.model_runner)
            every_tokens, every_positions, every_tables = tokens, positions, tables
        else:
            # Meta's rows: every row of the cache decodes. An unused one decodes a dummy token at its last position,
            # which any request writes before it reads it (a prompt fills the positions before, a decode step
            # writes its own position first).
            rows = torch.arange(tokens.shape[0], device=tokens.device) if slots is None else slots
            every_tokens = tokens.new_zeros(self.batch_size).index_copy_(0, rows, tokens)
            every_positions = positions.new_full((self.batch_size,), self.max_seq_len - 1)
            every_positions.index_copy_(0, rows, positions)
            every_tables = self.model.cache.contiguous_tables(self.batch_size, self.max_seq_len, tokens.device)
        if self.compile_s is None:
            started = time.perf_counter()
            logits = self._compiled(every_tokens, every_positions, every_tables)
            self.compile_s = time.perf_counter() - started
            print0(f"Compiled the decode step in {self.compile_s:.1f} s")
        else:
            logits = self._compiled(every_tokens, every_positions, every_tables)
        if slots is not None:
            return logits[slots]  # a gather: a copy, safe from the next CUDA graph replay
        # A CUDA graph's output lives in memory the next replay overwrites.
        rows = logits[: tokens.shape[0]]
        return rows.clone() if self._cuda_graphs else rows
