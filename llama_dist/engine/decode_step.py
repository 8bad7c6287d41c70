"""The decode step, eager or compiled: one new token for each sequence of the batch, each at its own position.

The engine's ModelRunner decodes through it when a step is decodes only, and decides how it runs (`step_mode`).
Eager, it runs the batch's rows over the cache positions in use so far (the CPU path: fastest there). Compiled (the
default on CUDA), it runs a few fixed shapes, so that it is traced once per shape: the rows padded up to the next
batch-size bucket (powers of two up to max_batch_size, and max_batch_size), their block tables up to the next
context bucket (powers of two of blocks from MIN_CONTEXT_BUCKET_TOKENS up, and a whole row: a short context does
not read max_seq_len positions), each row masked to its own position. Its collectives are functional ones inside the
graph (`parallel`), and where they are NCCL's each shape's step is captured as a CUDA graph
(`mode="reduce-overhead"`) and replayed.
"""

from __future__ import annotations

import enum
import time

import torch

from llama_dist.dist.groups import print0
from llama_dist.model.llama import Transformer

# The shortest context a compiled step is traced for: below it, reading a few hundred positions more costs less
# than another compiled shape (each is a compile at warm-up, and a CUDA graph's memory).
MIN_CONTEXT_BUCKET_TOKENS = 256
# Traces dynamo may add beyond the buckets' shapes before it gives up on compiling (a guard failing on some state
# it checks, e.g. a grad mode) and runs eagerly.
RECOMPILE_SLACK = 4


class StepMode(enum.Enum):
    EAGER = "eager"
    COMPILED = "compiled"
    CUDA_GRAPHS = "compiled+graphs"  # compiled, each shape captured once as a CUDA graph and replayed


def step_mode(device_type: str, cuda_backend: str | None, world_size: int, compile: bool | None = None) -> StepMode:
    """How decode-only steps run on a rank of `world_size` model-parallel ranks whose tensors live on `device_type`,
    their collectives on CUDA tensors carried by `cuda_backend` ("nccl", "gloo"; None: no group).

    compile None: compiled on CUDA (launch overhead dominates an eager decode step there), eager on CPU (eager is
    faster there: docs/performance.md). CUDA graphs only on CUDA and only where every collective can be in one: a
    graph replays kernels without the host, and gloo's collectives run on the host (ranks sharing a GPU)."""
    compiled = device_type == "cuda" if compile is None else bool(compile)
    if not compiled:
        return StepMode.EAGER
    if device_type == "cuda" and (world_size == 1 or cuda_backend == "nccl"):
        return StepMode.CUDA_GRAPHS
    return StepMode.COMPILED


def default_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes a compiled step is traced for: 1, 2, 4, ... below max_batch_size, and max_batch_size."""
    return tuple(sorted({1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size}
                        | {max_batch_size}))


def default_context_buckets(max_blocks: int, block_size: int) -> tuple[int, ...]:
    """Context lengths, in cache blocks, a compiled step is traced for: the powers of two of blocks from the first
    that holds MIN_CONTEXT_BUCKET_TOKENS, below max_blocks, and max_blocks (a row of max_seq_len positions)."""
    first = -(-MIN_CONTEXT_BUCKET_TOKENS // block_size)
    return tuple(sorted({1 << i for i in range(max_blocks.bit_length()) if first <= 1 << i < max_blocks}
                        | {max_blocks}))


def bucket_for(buckets: tuple[int, ...], size: int) -> int:
    """The smallest of the (ascending) `buckets` that holds `size`."""
    return next(b for b in buckets if b >= size)


def _checked_buckets(buckets, largest: int, what: str) -> tuple[int, ...]:
    buckets = tuple(sorted(set(buckets)))
    if not buckets or buckets[0] < 1 or buckets[-1] != largest:
        raise ValueError(f"{what} buckets must be positive and end at {largest}, got {buckets}")
    return buckets


class DecodeStep:
    """`step(tokens, positions, length, slots, tables)`: next-token logits of one token per row.

    tokens, positions: (bsz,) tensors: row i's newest token and the position it goes to. Eager, the rows attend
    over cache positions [0, length) (every position must be below it). slots: a (bsz,) tensor of distinct rows of
    Meta's contiguous cache (the rows one after the other when None). tables: the rows' block tables in the model's
    cache instead (the engine's paged rows); compiled, the caller pads the rows to a batch bucket and the tables to
    a context bucket (`bucket_for`). Returns float32 logits (bsz, vocab) on rank 0; None on the other ranks when
    eager (compiled, they get them too and ignore them).
    """

    def __init__(self, model: Transformer, mode: StepMode = StepMode.EAGER, buckets: tuple[int, ...] | None = None,
                 context_buckets: tuple[int, ...] | None = None):
        self.model, self.mode = model, mode
        self.compiled = mode != StepMode.EAGER
        self.buckets = _checked_buckets(default_buckets(self.batch_size) if buckets is None else buckets,
                                        self.batch_size, "decode batch")
        block_size = model.cache.block_size
        max_blocks = model.cache.row_blocks(self.max_seq_len)
        self.context_buckets = _checked_buckets(
            default_context_buckets(max_blocks, block_size) if context_buckets is None else context_buckets,
            max_blocks, f"decode context (in blocks of {block_size})")
        self._shapes = set(self.shapes)
        self.compile_s: dict[tuple[int, int], float] = {}  # (rows, context blocks) -> its first call's seconds
        self._cuda_graphs = mode == StepMode.CUDA_GRAPHS
        if self.compiled:
            # dynamo's recompile limit counts the traces of one function, whatever their shapes: every
            # (batch, context) bucket is one, all of them must fit (its default, 8, would leave the rest eager).
            limit = len(self.buckets) * len(self.context_buckets) + RECOMPILE_SLACK
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, limit)
            if model.tok_embeddings.weight.is_cuda:
                # Inductor then decomposes a one-row matrix product into a multiply and a reduction it tunes (what
                # reaches the memory bandwidth at batch 1), fusing an int8 weight's conversion and scale into it.
                torch._inductor.config.coordinate_descent_tuning = True
            # fullgraph: a graph break would silently fall back to slow eager pieces; dynamic=False: every shape is
            # one of the buckets.
            mode_name = "reduce-overhead" if self._cuda_graphs else None
            self._compiled = torch.compile(self._every_row, fullgraph=True, dynamic=False, mode=mode_name)

    @property
    def batch_size(self) -> int:
        """The most rows a step decodes."""
        return self.model.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, context blocks) shape the compiled step runs."""
        return [(rows, blocks) for rows in self.buckets for blocks in self.context_buckets]

    def bucket_for(self, rows: int) -> int:
        """The smallest batch bucket that holds `rows` rows."""
        return bucket_for(self.buckets, rows)

    def context_bucket_for(self, blocks: int) -> int:
        """The smallest context bucket that holds `blocks` blocks."""
        return bucket_for(self.context_buckets, blocks)

    def _every_row(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        length = tables.shape[1] * self.model.cache.block_size  # a constant of the traced shape
        return self.model.decode(tokens, positions, length, gather="all", tables=tables)

    def __call__(self, tokens, positions, length: int | None = None, slots: torch.Tensor | None = None,
                 tables: torch.Tensor | None = None):
        if not self.compiled:
            return self.model.decode(tokens, positions, length, slots=slots, tables=tables)
        if tables is not None:  # the caller padded its rows and tables to buckets (engine.model_runner)
            if (tokens.shape[0], tables.shape[1]) not in self._shapes:
                raise ValueError(f"{tokens.shape[0]} rows of {tables.shape[1]} blocks are not a bucket shape "
                                 f"(rows {self.buckets}, blocks {self.context_buckets})")
            every_tokens, every_positions, every_tables = tokens, positions, tables
        else:
            # Meta's rows over their whole context, padded to a bucket (every row of the cache when `slots` picks
            # them). A padding row decodes a dummy token at its last position, which any request writes before it
            # reads it (a prompt fills the positions before, a decode step writes its own position first).
            size = self.bucket_for(tokens.shape[0]) if slots is None else self.batch_size
            rows = torch.arange(tokens.shape[0], device=tokens.device) if slots is None else slots
            every_tokens = tokens.new_zeros(size).index_copy_(0, rows, tokens)
            every_positions = positions.new_full((size,), self.max_seq_len - 1)
            every_positions.index_copy_(0, rows, positions)
            every_tables = self.model.cache.contiguous_tables(size, self.max_seq_len, tokens.device)
        shape = (every_tokens.shape[0], every_tables.shape[1])
        if shape not in self.compile_s:
            started = time.perf_counter()
            logits = self._compiled(every_tokens, every_positions, every_tables)
            self.compile_s[shape] = time.perf_counter() - started
            print0(f"Compiled the decode step for {shape[0]} row(s) of {shape[1]} cache block(s) in "
                   f"{self.compile_s[shape]:.1f} s")
        else:
            logits = self._compiled(every_tokens, every_positions, every_tables)
        if slots is not None:
            return logits[slots]  # a gather: a copy, safe from the next CUDA graph replay
        # A CUDA graph's output lives in memory the next replay overwrites.
        rows = logits[: tokens.shape[0]]
        return rows.clone() if self._cuda_graphs else rows
