"""The Llama transformer as math: RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU.

Every module here holds this rank's slice only; which slice, and the collectives that join the slices, live
in `parallel.py`. Models are built and filled from checkpoints by `llama_dist.checkpoint.loader.load_model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_dist.config import ModelArgs
from llama_dist.dist.groups import model_parallel_world_size
from llama_dist.model.kernels import local_linear
from llama_dist.model.parallel import (
    ColumnParallelLinear,
    KVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    fuse_weights,
    gather_last_dim,
    gather_last_dim_to_rank0,
    local_kv_heads,
)
from llama_dist.model.rope import apply_rope, rope_tables


@dataclass
class TransformerOutput:
    logits: torch.Tensor | None  # float32 (bsz, seqlen, vocab); None on ranks > 0 when gathered to rank 0
    # n_layers + 1 tensors (bsz, seqlen, dim), model dtype: the embedding, then each block's output, except that
    # the last entry is after the final norm (transformers' LlamaModel convention). Identical on every rank.
    hidden_states: tuple[torch.Tensor, ...] | None = None
    # n_layers tensors (bsz, n_heads, seqlen, start_pos + seqlen), float32 softmax probabilities of all heads,
    # on every rank.
    attentions: tuple[torch.Tensor, ...] | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: in bf16/fp16 the mean of squares loses too many bits.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


@dataclass(frozen=True)
class CacheWindow:
    """The KV-cache entries one forward writes and then attends over.

    rows: the cache slots of the batch's rows: a (bsz,) tensor, or slice(0, bsz) for slots 0..bsz-1.
    Prefill (`decoded_at` None): every row writes its tokens at positions [start, start + seqlen).
    Decode (`decoded_at` the paired (slot, position) index tensors, seqlen 1): row i writes its token at
    position decoded_at[1][i] of slot decoded_at[0][i]; rows may sit at different positions (the server's slots),
    and none of it is a Python number that changes from step to step, so a compiled decode step is traced once.
    Either way every row attends over cache positions [0, length); `mask` hides what each query may not see.
    """

    rows: torch.Tensor | slice
    length: int
    start: int = 0
    decoded_at: tuple[torch.Tensor, torch.Tensor] | None = None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // model_parallel_world_size()
        self.n_local_kv_heads = local_kv_heads(args.n_kv_heads)[1]
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim)
        self.wk = KVParallelLinear(args.dim, args.n_kv_heads, self.head_dim)
        self.wv = KVParallelLinear(args.dim, args.n_kv_heads, self.head_dim)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim)
        self.wqkv: torch.Tensor | None = None  # wq, wk, wv stacked, set by fuse() for inference
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def fuse(self) -> None:
        self.wqkv = fuse_weights(self.wq, self.wk, self.wv)

    def allocate_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device) -> None:
        shape = (max_batch_size, max_seq_len, self.n_local_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)
        if torch.device(device).type == "cuda":
            # Written in place by every step: a CUDA graph may keep their addresses instead of copying them in.
            torch._dynamo.mark_static_address(self.cache_k)
            torch._dynamo.mark_static_address(self.cache_v)

    def _write_and_read_cache(self, k, v, window: CacheWindow):
        """Store this forward's keys and values, return (keys, values) over the window, (bsz, heads, positions,
        head_dim)."""
        if window.decoded_at is None:
            end = window.start + k.shape[1]
            self.cache_k[window.rows, window.start : end] = k
            self.cache_v[window.rows, window.start : end] = v
        else:  # one token a row, each at its own position
            self.cache_k[window.decoded_at] = k[:, 0]
            self.cache_v[window.decoded_at] = v[:, 0]
        # Views when the rows are slots 0..bsz-1 (offline generation, the server's decode over every slot).
        keys = self.cache_k[window.rows, : window.length].transpose(1, 2)
        values = self.cache_v[window.rows, : window.length].transpose(1, 2)
        return keys, values

    def forward(self, x, window: CacheWindow | None, cos, sin, mask, need_weights: bool = False):
        bsz, seqlen, _ = x.shape
        if self.wqkv is not None:
            kv_width = self.n_local_kv_heads * self.head_dim
            q, k, v = local_linear(x, self.wqkv).split([self.n_local_heads * self.head_dim, kv_width, kv_width], -1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.cache_k is None:  # training: the whole sequence is here, nothing to remember
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        else:
            keys, values = self._write_and_read_cache(k, v, window)
        q = q.transpose(1, 2)

        n_rep = self.n_local_heads // self.n_local_kv_heads
        weights = None
        if need_weights:
            keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
            scores = (q @ keys.transpose(2, 3)).float() / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = F.softmax(scores, dim=-1)
            out = weights.type_as(q) @ values
        elif q.device.type == "cpu" and q.dtype != torch.float32:
            # On CPU, oneDNN compiles a kernel for every new low-precision shape, and the key length grows
            # by one each decode step: attention in float32 (small next to the weights) avoids a compile per step.
            out = F.scaled_dot_product_attention(
                q.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=n_rep > 1
            ).type_as(q)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=n_rep > 1)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(out), weights


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden)
        self.w3 = ColumnParallelLinear(args.dim, hidden)
        self.w2 = RowParallelLinear(hidden, args.dim)
        self.w13: torch.Tensor | None = None  # w1 and w3 stacked, set by fuse() for inference

    def fuse(self) -> None:
        self.w13 = fuse_weights(self.w1, self.w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = local_linear(x, self.w13).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, window, cos, sin, mask, need_weights=False):
        attn_out, weights = self.attention(self.attention_norm(x), window, cos, sin, mask, need_weights)
        h = x + attn_out
        return h + self.feed_forward(self.ffn_norm(h)), weights


def _first_position(start_pos: int | torch.Tensor, seqlen: int) -> int:
    """The first position of a forward given as an int or as the positions tensor (input_pos) of its tokens."""
    if not isinstance(start_pos, torch.Tensor):
        return start_pos
    positions = start_pos
    if positions.dim() != 1 or positions.shape[0] != seqlen or positions.is_floating_point():
        raise ValueError(
            f"input_pos must be a 1-D integer tensor of the {seqlen} positions of the tokens, "
            f"got {positions.dtype} of shape {tuple(positions.shape)}"
        )
    first = int(positions[0])
    if not torch.equal(positions.cpu(), torch.arange(first, first + seqlen)):
        raise ValueError(f"input_pos must be consecutive positions (torch.arange(start, start + {seqlen})), got "
                         f"{positions.tolist()[:8]}")
    return first


def gather_heads(local: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each layer's (bsz, local heads, q, k) probabilities -> (bsz, all heads, q, k) on every rank.

    Rank r holds query heads [r * local, (r + 1) * local), so joining in rank order gives Meta's head order.
    One all-gather over the model-parallel group carries every layer.
    """
    stacked = torch.stack(local).movedim(2, -1).contiguous()  # (layers, bsz, q, k, local heads)
    return gather_last_dim(stacked).movedim(-1, 2).contiguous().unbind(0)


class Transformer(nn.Module):
    """This rank's slice of a Llama model.

    `Transformer(args)` allocates the slice with uninitialised weights; `args` must be valid for the
    model-parallel world size (`args.validate`). `fuse()` and `post_init()` come before the weights are filled
    (they land in the fused stacks) and the first forward: `llama_dist.checkpoint.loader.load_model` does all of it.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size)
        self.tie_embeddings()
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    @property
    def params(self) -> ModelArgs:
        """The model's ModelArgs (Meta's reference names them `params`; `args` here)."""
        return self.args

    # Transformer.from_pretrained(config, path, device=None), the seed's way to load, is bound by
    # llama_dist.checkpoint.loader: loading reads files, and nothing in llama_dist.model does.

    def tie_embeddings(self) -> None:
        """With args.tie_word_embeddings, make the output layer's weight the embedding's (one tensor per rank).

        The vocab-parallel embedding and the column-parallel output split the vocabulary identically (rank r
        holds rows [r * V/N, (r + 1) * V/N) of both), so each rank's slice of one is its slice of the other.
        """
        # Only a float output is the embedding: a quantized one (or None, before loading quantizes it) stays apart.
        if self.args.tie_word_embeddings and isinstance(self.output.weight, nn.Parameter):
            self.output.weight = self.tok_embeddings.weight

    def fuse(self) -> None:
        """Stack each layer's wq/wk/wv and w1/w3 for inference; their weights become views of the stacks."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()

    def matmul_weights(self) -> list[tuple[nn.Module, str, list[nn.Module]]]:
        """Every weight an inference forward multiplies by, as (owner, attribute, the split linears it stacks):
        each layer's wqkv, wo, w13 and w2, then output. Quantization replaces `owner.attribute` with a quantized
        weight of the stacked rows (per-row scales make that the same as quantizing each part)."""
        weights = []
        for layer in self.layers:
            attention, ffn = layer.attention, layer.feed_forward
            weights += [
                (attention, "wqkv", [attention.wq, attention.wk, attention.wv]),
                (attention.wo, "weight", [attention.wo]),
                (ffn, "w13", [ffn.w1, ffn.w3]),
                (ffn.w2, "weight", [ffn.w2]),
            ]
        return weights + [(self.output, "weight", [self.output])]

    def post_init(self, kv_cache: bool = True) -> None:
        """Set up what is derived rather than loaded: RoPE tables (float32) and the KV cache (model dtype).

        Call it after the weights have their final device and dtype (the tables and cache follow
        `tok_embeddings.weight`, which is never quantized); the loader calls it. The cache holds
        max_batch_size x max_seq_len positions of this rank's KV heads per layer. kv_cache=False is for training,
        where every forward sees whole sequences from position 0.
        """
        self.tie_embeddings()  # again: moving the model between devices makes new, separate parameters
        param = self.tok_embeddings.weight
        self.rope_cos, self.rope_sin = rope_tables(self.args, param.device)
        for layer in self.layers if kv_cache else ():
            layer.attention.allocate_cache(self.args.max_batch_size, self.args.max_seq_len, param.dtype, param.device)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        *,
        last_only: bool = False,
        gather: str = "all",
        slots: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> TransformerOutput:
        """Logits for `tokens` (bsz, seqlen) placed at positions start_pos.. of each sequence's cache.

        start_pos: the first position (Meta's `model(tokens, start_pos)`), or the positions themselves as a 1-D
        LongTensor shared by the rows (the seed's and gpt-fast's `model(ids, input_pos)`): consecutive,
        `torch.arange(start_pos, start_pos + seqlen)`; both give identical logits.

        output_hidden_states / output_attentions: also return them (see TransformerOutput); None takes the
        config's default. Attentions are computed with explicit softmax instead of the fused kernel and all-gathered
        across the model-parallel group, so every rank receives every head. Both cover all `seqlen` positions,
        whatever `last_only` and `gather` say.
        last_only: project only the last position onto the vocabulary (all that sampling needs).
        gather: "all" returns the full-vocabulary logits on every rank; "rank0" only on rank 0 (others get
        None), which is what rank-0 sampling needs and moves 1/N of the bytes.
        slots: the cache slots of the rows, a (bsz,) tensor (default: slots 0..bsz-1); the server prefills
        requests into the slots it gave them.
        logits_at: a (bsz,) tensor: project only row i's position logits_at[i] (relative to start_pos) onto the
        vocabulary, e.g. the last token of each right-padded prompt; logits are then (bsz, 1, vocab).
        """
        self._check_ready(gather)
        bsz, seqlen = tokens.shape
        start_pos = _first_position(start_pos, seqlen)
        end = start_pos + seqlen
        if bsz > self.args.max_batch_size or end > self.args.max_seq_len:
            raise ValueError(
                f"batch {bsz} x positions {start_pos}..{end} exceeds the cache "
                f"(max_batch_size={self.args.max_batch_size}, max_seq_len={self.args.max_seq_len})"
            )
        want_hidden = self.args.output_hidden_states if output_hidden_states is None else output_hidden_states
        want_attentions = self.args.output_attentions if output_attentions is None else output_attentions

        window = CacheWindow(rows=slice(0, bsz) if slots is None else slots, length=end, start=start_pos)
        cos, sin = self.rope_cos[None, start_pos:end], self.rope_sin[None, start_pos:end]
        mask = None
        if seqlen > 1:
            # Query i sits at position start_pos + i and may look at every cached position up to itself.
            positions = torch.arange(end, device=tokens.device)
            mask = positions[None, :] <= positions[start_pos:, None]
        h = self.tok_embeddings(tokens)
        hidden = [h] if want_hidden else None
        attentions = [] if want_attentions else None
        for layer in self.layers:
            h, weights = layer(h, window, cos, sin, mask, want_attentions)
            if hidden is not None:
                hidden.append(h)
            if attentions is not None:
                attentions.append(weights)

        def projected(h):  # the positions whose logits are asked for
            if logits_at is not None:
                return h[torch.arange(bsz, device=h.device), logits_at][:, None]
            return h[:, -1:] if last_only else h

        if hidden is None:
            h = self.norm(projected(h))
        else:  # the last hidden state is the final norm's output, as in transformers
            h = hidden[-1] = self.norm(h)
            h = projected(h)
        logits = self._logits(h, gather)
        return TransformerOutput(
            logits=logits,
            hidden_states=None if hidden is None else tuple(hidden),
            attentions=None if attentions is None else gather_heads(attentions),
        )

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        length: int | None = None,
        gather: str = "rank0",
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """One decode step: token i (of `tokens`, (bsz,)) at position positions[i] of cache slot i (of slots[i]
        when given); float32 logits (bsz, vocab) of the next token (None on ranks > 0 with gather="rank0").

        Each row attends over cache positions [0, length) up to its own (length None: the whole cache, so
        nothing here depends on the positions' values: what a compiled step needs). The caller keeps positions
        below max_seq_len and length above them: checking would cost a device sync per step.
        """
        self._check_ready(gather)
        bsz = tokens.shape[0]
        if bsz > self.args.max_batch_size:
            raise ValueError(f"batch {bsz} exceeds the cache (max_batch_size={self.args.max_batch_size})")
        length = self.args.max_seq_len if length is None else length
        rows = torch.arange(bsz, device=tokens.device) if slots is None else slots
        # Reading slots 0..bsz-1 through a slice keeps the cache reads views rather than gathers.
        window = CacheWindow(rows=slice(0, bsz) if slots is None else slots, length=length,
                             decoded_at=(rows, positions))
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        mask = (torch.arange(length, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        h = self.tok_embeddings(tokens[:, None])
        for layer in self.layers:
            h, _ = layer(h, window, cos, sin, mask)
        logits = self._logits(self.norm(h), gather)
        return None if logits is None else logits[:, -1]

    def _check_ready(self, gather: str) -> None:
        if self.rope_cos is None:
            raise RuntimeError("call post_init() before the first forward (load_model does)")
        if gather not in ("all", "rank0"):
            raise ValueError(f"gather must be 'all' or 'rank0', got {gather!r}")

    def _logits(self, h: torch.Tensor, gather: str) -> torch.Tensor | None:
        local_logits = self.output(h)
        logits = gather_last_dim_to_rank0(local_logits) if gather == "rank0" else gather_last_dim(local_logits)
        return None if logits is None else logits.float()
