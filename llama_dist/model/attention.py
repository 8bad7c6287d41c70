"""Attention over a KV cache the model is given, for a step that is a flat batch of rows.

A step's tokens are one flat batch (total tokens, dim): the matmuls see every token at once. Attention alone
needs the rows apart: each row attends over its own cache context. `StepLayout` says where each row's tokens sit
in the flat batch, which cache row holds its keys and values, and how long its context is:

- decode rows first: one token each, each at its own position (a tensor: a compiled step is traced once, whatever
  the positions), attending together over the first `decode_kv_len` cache positions with a per-row mask;
- then groups of rows that share their query length and context length (a prefill chunk, Meta's batched
  forward), each group one batched attention call with a causal mask offset by the tokens cached before.

`KVCache` is the memory: per layer, keys and values of shape (cache rows, positions per row, local KV heads,
head_dim). Every new token's key and value are written to the flat index `slot_mapping` gives it, before the
step attends; rows are read through their cache row (a block of a whole row: the paged cache replaces the
allocator, not this interface).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """This rank's keys and values for `rows` sequences of up to `max_seq_len` positions, per layer."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, n_layers: int, rows: int, max_seq_len: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (rows, max_seq_len, kv_heads, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        if torch.device(device).type == "cuda":
            # Written in place by every step: a CUDA graph may keep their addresses instead of copying them in.
            for tensor in k + v:
                torch._dynamo.mark_static_address(tensor)
        return cls(k, v)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)


@dataclass
class RowGroup:
    """Rows attended together: `n_rows` rows of `query_len` tokens each, from flat token `token_start` on, each
    attending over cache positions [0, context_len) of its cache row (the last query_len of them are its own)."""

    token_start: int
    n_rows: int
    query_len: int
    context_len: int
    cache_rows: torch.Tensor | slice


@dataclass
class DecodeRows:
    """The step's leading one-token rows: row i's token at `positions[i]` of cache row `cache_rows[i]`, every row
    reading cache positions [0, kv_len) masked to its own position."""

    cache_rows: torch.Tensor | slice
    positions: torch.Tensor
    kv_len: int


@dataclass
class StepLayout:
    """Where a step's flat tokens go: their positions (RoPE), their cache slots, and how rows attend."""

    positions: torch.Tensor  # (tokens,) each token's position in its sequence
    slot_mapping: torch.Tensor  # (tokens,) cache row * max_seq_len + position: where its key and value go
    decode: DecodeRows | None = None
    groups: list[RowGroup] = field(default_factory=list)

    @classmethod
    def uniform(cls, rows: int, query_len: int, start_pos: int, max_seq_len: int, device,
                cache_rows: torch.Tensor | None = None) -> StepLayout:
        """`rows` rows of `query_len` tokens at positions start_pos.., in cache rows 0..rows-1 (or `cache_rows`):
        Meta's `model(tokens, start_pos)`."""
        positions = torch.arange(start_pos, start_pos + query_len, device=device).repeat(rows)
        row_ids = torch.arange(rows, device=device) if cache_rows is None else cache_rows
        slot_mapping = row_ids.repeat_interleave(query_len) * max_seq_len + positions
        group = RowGroup(0, rows, query_len, start_pos + query_len,
                         slice(0, rows) if cache_rows is None else cache_rows)
        return cls(positions, slot_mapping, groups=[group])

    @classmethod
    def decoding(cls, positions: torch.Tensor, kv_len: int, max_seq_len: int,
                 cache_rows: torch.Tensor | None = None) -> StepLayout:
        """One token a row, row i at positions[i] of cache row i (or cache_rows[i]), attending over [0, kv_len)."""
        rows = positions.shape[0]
        row_ids = torch.arange(rows, device=positions.device) if cache_rows is None else cache_rows
        decode = DecodeRows(slice(0, rows) if cache_rows is None else cache_rows, positions, kv_len)
        return cls(positions, row_ids * max_seq_len + positions, decode=decode)


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
    if layout.decode is not None:
        rows = layout.decode
        keys = cache[0][rows.cache_rows, : rows.kv_len]  # (rows, kv_len, kv heads, head_dim)
        values = cache[1][rows.cache_rows, : rows.kv_len]
        # Each row sees its own positions up to its token's; nothing here depends on the positions' values.
        mask = (torch.arange(rows.kv_len, device=q.device)[None, :] <= rows.positions[:, None])[:, None, None, :]
        n = rows.positions.shape[0]
        out, _ = _sdpa(q[:n, None], keys, values, mask, False)
        outputs.append(out.reshape(n, -1))
    if need_weights and len(layout.groups) != 1:
        raise ValueError("attention weights come from a uniform batch (Meta's model(tokens, start_pos)) only")
    for group in layout.groups:
        count = group.n_rows * group.query_len
        queries = q[group.token_start : group.token_start + count].unflatten(0, (group.n_rows, group.query_len))
        if cache is None:
            keys = k[group.token_start : group.token_start + count].unflatten(0, (group.n_rows, group.query_len))
            values = v[group.token_start : group.token_start + count].unflatten(0, (group.n_rows, group.query_len))
        else:
            keys = cache[0][group.cache_rows, : group.context_len]
            values = cache[1][group.cache_rows, : group.context_len]
        mask = None
        if group.query_len > 1:
            # Query i sits at position context_len - query_len + i and may look at every position up to itself.
            positions = torch.arange(group.context_len, device=q.device)
            mask = positions[None, :] <= positions[group.context_len - group.query_len :, None]
        out, weights = _sdpa(queries, keys, values, mask, need_weights)
        outputs.append(out.reshape(count, -1))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), weights


def _sdpa(q, keys, values, mask, need_weights: bool):
    """q: (rows, queries, heads, head_dim); keys, values: (rows, keys, kv heads, head_dim) -> (rows, queries,
    heads, head_dim), and the (rows, heads, queries, keys) probabilities when need_weights."""
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
    elif q.device.type == "cpu" and q.dtype != torch.float32:
        # On CPU, oneDNN compiles a kernel for every new low-precision shape, and the key length grows by one each
        # decode step: attention in float32 (small next to the weights) avoids a compile per step.
        out = F.scaled_dot_product_attention(
            q.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=n_rep > 1
        ).type_as(q)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=n_rep > 1)
    return out.transpose(1, 2), weights
