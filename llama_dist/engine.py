"""The decode step, eager or compiled: one new token for each sequence of the batch, each at its own position.

Offline generation (`generation.Llama`) and the server (`serve.engine_loop`) both decode through a `DecodeStep`.
Eager, it runs the batch's rows over the cache positions in use so far (the CPU path: fastest there). Compiled
(the default on CUDA), it always runs every cache slot over the whole cache with a position mask, so its shapes
never change: it is traced once, its collectives are functional ones inside the graph (`parallel`), and on CUDA
the whole step is captured as a CUDA graph (`mode="reduce-overhead"`) and replayed, one launch a step.
"""

from __future__ import annotations

import time

import torch

from llama_dist.distributed import print0
from llama_dist.model import Transformer


def compiles_by_default(device: torch.device) -> bool:
    """Compile on CUDA (launch overhead dominates an eager decode step there); on CPU eager decode is faster (the
    compiled step attends over the whole cache and every slot: docs/performance.md)."""
    return torch.device(device).type == "cuda"


class DecodeStep:
    """`step(tokens, positions, length)`: next-token logits of rows 0..bsz-1 of the cache.

    tokens, positions: (bsz,) tensors: row i's newest token and the position it goes to. length: the rows attend
    over cache positions [0, length) (eager only; every position must be below it). Returns float32 logits
    (bsz, vocab) on rank 0; None on the other ranks when eager (compiled, they get them too and ignore them).
    """

    def __init__(self, model: Transformer, compile: bool | None = None):
        self.model = model
        device = model.tok_embeddings.weight.device
        self.compiled = compiles_by_default(device) if compile is None else bool(compile)
        self.compile_s: float | None = None  # measured on the first compiled call
        self._cuda_graphs = device.type == "cuda"
        if self.compiled:
            # fullgraph: a graph break would silently fall back to slow eager pieces; dynamic=False: every shape is
            # fixed by the model's max_batch_size and max_seq_len.
            mode = "reduce-overhead" if self._cuda_graphs else None
            self._compiled = torch.compile(self._every_slot, fullgraph=True, dynamic=False, mode=mode)

    def _every_slot(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, positions, gather="all")

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, length: int | None = None):
        if not self.compiled:
            return self.model.decode(tokens, positions, length)
        rows, slots = tokens.shape[0], self.model.args.max_batch_size
        # Fresh contiguous inputs: a column of the caller's token grid has a stride that would be traced too.
        tokens, positions = tokens.contiguous(), positions.contiguous()
        if rows < slots:
            # Unused slots decode a dummy token at position 0 (their caches hold nothing anyone reads): the
            # compiled step always sees every slot.
            tokens = torch.cat((tokens, tokens.new_zeros(slots - rows)))
            positions = torch.cat((positions, positions.new_zeros(slots - rows)))
        if self.compile_s is None:
            started = time.perf_counter()
            logits = self._compiled(tokens, positions)
            self.compile_s = time.perf_counter() - started
            print0(f"Compiled the decode step in {self.compile_s:.1f} s")
        else:
            logits = self._compiled(tokens, positions)
        # A CUDA graph's output lives in memory the next replay overwrites.
        return logits[:rows].clone() if self._cuda_graphs else logits[:rows]
