"""Attention over a KV cache the model is given, for a step that is a flat batch of rows.

A step's tokens are one flat batch (total tokens, dim): the matmuls see every token at once. Attention alone
needs the rows apart: each row attends over its own cache context. `StepLayout` says where each row's tokens sit
in the flat batch, which cache row holds its keys and values, and how long its context is:

- decode rows first: one token each, each at its own position (a tensor: a compiled step is traced once, whatever
  the positions), attending together over the first `decode_kv_len` cache positions with a per-row mask;
- then groups of rows that share their query length and context length (a prefill chunk, Meta's batched
  forward), each group one batched attention call with a causal mask offset by the tokens cached before.

`KVCache` is the memory: per layer, keys and values in fixed blocks of shape (blocks, block_size, local KV heads,
head_dim). Every new token's key and value are written to the flat index `slot_mapping` gives it (block * block_size
+ offset), before the step attends; each row reads its context through its block table: as a view of the cache
when every row's blocks lie evenly in memory (Meta's contiguous rows), a slice per run of consecutive blocks on
CPUs (the engine hands out runs there), else one gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """This rank's keys and values: per layer, `num_blocks` blocks of `block_size` positions of its KV heads."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, n_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        if torch.device(device).type == "cuda":
            # Written in place by every step: a CUDA graph may keep their addresses instead of copying them in.
            for tensor in k + v:
                torch._dynamo.mark_static_address(tensor)
        return cls(k, v)

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def row_blocks(self, max_seq_len: int) -> int:
        """Blocks one sequence of max_seq_len positions spans."""
        return -(-max_seq_len // self.block_size)

    def contiguous_tables(self, rows: int, max_seq_len: int, device) -> torch.Tensor:
        """Block tables of rows 0..rows-1 laid out one after the other (Meta's `model(tokens, start_pos)`): row r
        holds blocks [r * n, (r + 1) * n), n = row_blocks(max_seq_len)."""
        n = self.row_blocks(max_seq_len)
        if rows * n > self.num_blocks:
            raise ValueError(f"{rows} rows of {max_seq_len} positions need {rows * n} blocks of {self.block_size}; "
                             f"the cache has {self.num_blocks}")
        return torch.arange(rows * n, device=device).view(rows, n)


def slots_of(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache index of each (row's block table, position) pair: block * block_size + offset."""
    return block_tables.gather(-1, (positions // block_size).unsqueeze(-1)).squeeze(-1) * block_size + positions % block_size


def read_context(cache: torch.Tensor, tables: torch.Tensor | Strided | Runs, length: int,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """(rows, length, kv heads, head_dim): each row's first `length` positions through its block table; a view when
    the layout is `Strided`, slices of runs copied into one tensor of `dtype` (default the cache's) for `Runs`, else
    a gather."""
    if isinstance(tables, Runs):
        flat = cache.view(-1, *cache.shape[2:])
        out = torch.empty((len(tables.rows), length, *cache.shape[2:]), dtype=dtype or cache.dtype, device=cache.device)
        for row, runs in zip(out, tables.rows):
            filled = 0
            for start, count in runs:
                count = min(count, length - filled)
                if count <= 0:
                    break
                row[filled : filled + count].copy_(flat[start : start + count])  # converts to dtype as it copies
                filled += count
            row[filled:].zero_()  # past this row's context: masked, but finite (0 x NaN would be NaN)
        return out
    if isinstance(tables, Strided):
        flat = cache.view(-1, *cache.shape[2:])
        kv = flat.stride(0)
        return flat.as_strided((tables.rows, length, *cache.shape[2:]),
                               (tables.row_stride * kv, kv, *flat.stride()[1:]), cache.storage_offset() + tables.first * kv)
    blocks = -(-length // cache.shape[1])
    # index_select over whole blocks: a few times faster than advanced indexing of the 4-d cache.
    picked = cache.view(cache.shape[0], -1).index_select(0, tables[:, :blocks].flatten())
    return picked.view(tables.shape[0], blocks * cache.shape[1], *cache.shape[2:])[:, :length]


@dataclass
class Strided:
    """Rows whose blocks lie one after the other in memory, row i's first position at flat index
    first + i * row_stride: read as a view, no copy."""

    first: int
    row_stride: int
    rows: int


@dataclass
class Runs:
    """Each row's context as runs of consecutive cache positions: rows[i] is [(first flat position, count), ...]."""

    rows: list[list[tuple[int, int]]]

    @classmethod
    def of(cls, tables: list[list[int]], block_size: int) -> Runs:
        rows = []
        for table in tables:
            runs: list[list[int]] = []
            for block_id in table:
                if runs and runs[-1][0] + runs[-1][1] == block_id * block_size:
                    runs[-1][1] += block_size
                else:
                    runs.append([block_id * block_size, block_size])
            rows.append([(start, count) for start, count in runs])
        return cls(rows)

    @property
    def num_runs(self) -> int:
        return sum(len(runs) for runs in self.rows)


def as_strided_rows(tables: list[list[int]], block_size: int) -> Strided | None:
    """The Strided layout of these block tables, or None when their blocks do not lie evenly in memory."""
    if not tables or not all(t == list(range(t[0], t[0] + len(t))) for t in tables):
        return None
    starts = [t[0] * block_size for t in tables]
    stride = starts[1] - starts[0] if len(starts) > 1 else 0
    if any(b - a != stride for a, b in zip(starts, starts[1:])) or (len(starts) > 1 and stride < 0):
        return None
    return Strided(starts[0], stride, len(tables))


@dataclass
class RowGroup:
    """Rows attended together: `n_rows` rows of `query_len` tokens each, from flat token `token_start` on, each
    attending over positions [0, context_len) of its block table (the last query_len of them are its own)."""

    token_start: int
    n_rows: int
    query_len: int
    context_len: int
    tables: torch.Tensor | Strided | Runs | None  # (n_rows, blocks) block tables, or their view or runs; None: no cache


@dataclass
class DecodeRows:
    """The step's leading one-token rows: row i's token at `positions[i]`, every row reading positions
    [0, kv_len) of its block table `tables[i]`, masked to its own position."""

    tables: torch.Tensor | Strided | Runs
    positions: torch.Tensor
    kv_len: int


@dataclass
class StepLayout:
    """Where a step's flat tokens go: their positions (RoPE), their cache slots, and how rows attend."""

    positions: torch.Tensor  # (tokens,) each token's position in its sequence
    slot_mapping: torch.Tensor  # (tokens,) block * block_size + offset: where its key and value go
    decode: DecodeRows | None = None
    groups: list[RowGroup] = field(default_factory=list)

    @classmethod
    def uniform(cls, rows: int, query_len: int, start_pos: int, cache: KVCache | None, max_seq_len: int,
                device) -> StepLayout:
        """`rows` rows of `query_len` tokens at positions start_pos.., in rows 0..rows-1 of `cache` laid out one after
        the other (Meta's `model(tokens, start_pos)`); no cache: training, each row attends over its own tokens."""
        positions = torch.arange(start_pos, start_pos + query_len, device=device).repeat(rows)
        if cache is None:
            return cls(positions, positions, groups=[RowGroup(0, rows, query_len, query_len, None)])
        tables = cache.contiguous_tables(rows, max_seq_len, device)
        slots = slots_of(tables.repeat_interleave(query_len, dim=0), positions, cache.block_size)
        view = Strided(0, tables.shape[1] * cache.block_size, rows)
        return cls(positions, slots, groups=[RowGroup(0, rows, query_len, start_pos + query_len, view)])

    @classmethod
    def decoding(cls, positions: torch.Tensor, kv_len: int, cache: KVCache, tables: torch.Tensor,
                 view: Strided | None = None) -> StepLayout:
        """One token a row, row i at positions[i] of block table tables[i], attending over [0, kv_len) (read
        through `view` when the tables lie evenly in memory)."""
        slots = slots_of(tables, positions, cache.block_size)
        return cls(positions, slots, decode=DecodeRows(tables if view is None else view, positions, kv_len))


def write_cache(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values (tokens, kv heads, head_dim) at their flat cache slots."""
    kv_heads, head_dim = cache_k.shape[-2:]
    cache_k.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    cache_v.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: StepLayout,
           cache: tuple[torch.Tensor, torch.Tensor] | None, need_weights: bool = False):
    """Attention of every row of the step. q: (tokens, heads, head_dim); k, v: (tokens, kv heads, head_dim), the
    step's own (already stored in `cache` when there is one; without a cache, training, each group attends over
    its own tokens). Returns ((tokens, heads * head_dim), weights of the single group when need_weights)."""
    outputs, weights = [], None
    dtype = _attention_dtype(q)
    if layout.decode is not None:
        rows = layout.decode
        keys = read_context(cache[0], rows.tables, rows.kv_len, dtype)  # (rows, kv_len, kv heads, head_dim)
        values = read_context(cache[1], rows.tables, rows.kv_len, dtype)
        n = rows.positions.shape[0]
        outputs.append(_decode_attention(q[:n], keys, values, rows.positions))
    if need_weights and len(layout.groups) != 1:
        raise ValueError("attention weights come from a uniform batch (Meta's model(tokens, start_pos)) only")
    for group in layout.groups:
        count = group.n_rows * group.query_len
        queries = q[group.token_start : group.token_start + count].unflatten(0, (group.n_rows, group.query_len))
        if cache is None:
            keys = k[group.token_start : group.token_start + count].unflatten(0, (group.n_rows, group.query_len))
            values = v[group.token_start : group.token_start + count].unflatten(0, (group.n_rows, group.query_len))
        else:
            keys = read_context(cache[0], group.tables, group.context_len, dtype)
            values = read_context(cache[1], group.tables, group.context_len, dtype)
        mask, causal = None, False
        if group.query_len > 1 and group.query_len == group.context_len and not need_weights:
            causal = True  # a whole prompt, nothing cached before it: SDPA's own causal mask (flash kernels take it)
        elif group.query_len > 1:
            # Query i sits at position context_len - query_len + i and may look at every position up to itself.
            positions = torch.arange(group.context_len, device=q.device)
            mask = positions[None, :] <= positions[group.context_len - group.query_len :, None]
        out, weights = _sdpa(queries, keys, values, mask, need_weights, causal)
        outputs.append(out.reshape(count, -1))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), weights


def _attention_dtype(q: torch.Tensor) -> torch.dtype:
    """On CPU, oneDNN compiles a kernel for every new low-precision shape, and the key length grows by one each
    decode step: attention runs in float32 there (small next to the weights), avoiding a compile per step."""
    return torch.float32 if q.device.type == "cpu" else q.dtype


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
    """One query token a row: q (rows, heads, head_dim), row i at positions[i], over keys and values (rows, kv_len,
    kv heads, head_dim) -> (rows, heads * head_dim).

    The query heads that share a KV head are folded into that head's query length: SDPA then sees kv-heads-many
    heads of n_rep queries against the keys as stored, with no copy of the keys per query head (repeat_kv) and no
    `enable_gqa`, which with a mask rules the flash kernels out. Each row sees its positions up to its token's;
    nothing here depends on the positions' values (a compiled step is traced once, whatever they are)."""
    rows, heads, head_dim = q.shape
    kv_heads, kv_len = keys.shape[2], keys.shape[1]
    # Query head h uses KV head h // n_rep (as repeat_kv lays them out): (rows, kv heads, n_rep, head_dim).
    queries = q.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    mask = (torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None])[:, None, None, :]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    dtype = _attention_dtype(q)
    if dtype != q.dtype:  # (a no-op `.to` still costs microseconds a layer, at every step)
        queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
    return (out if dtype == q.dtype else out.to(q.dtype)).reshape(rows, heads * head_dim)


def _sdpa(q, keys, values, mask, need_weights: bool, causal: bool = False):
    """q: (rows, queries, heads, head_dim); keys, values: (rows, keys, kv heads, head_dim) -> (rows, queries,
    heads, head_dim), and the (rows, heads, queries, keys) probabilities when need_weights. causal: SDPA's causal
    mask instead of `mask` (queries and keys the same positions)."""
    q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    n_rep = q.shape[1] // keys.shape[1]
    weights = None
    if need_weights:
        keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
        scores = (q @ keys.transpose(2, 3)).float() / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.softmax(scores, dim=-1)
        out = weights.type_as(q) @ values
    elif _attention_dtype(q) != q.dtype:
        out = F.scaled_dot_product_attention(
            q.float(), keys.float(), values.float(), attn_mask=mask, is_causal=causal, enable_gqa=n_rep > 1
        ).type_as(q)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=n_rep > 1)
    return out.transpose(1, 2), weights
