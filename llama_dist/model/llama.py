"""The Llama transformer as math: RMSNorm, RoPE, grouped-query attention over a given KV cache, SwiGLU.

Every module here holds this rank's slice only; which slice, and the collectives that join the slices, live
in `parallel.py`. Models are built and filled from checkpoints by `llama_dist.checkpoint.loader.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_dist.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, ModelArgs, check_runtime_limits
from llama_dist.dist.groups import model_parallel_world_size
from llama_dist.model.attention import KVCache, StepLayout, Strided, attend, write_cache
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


class Attention(nn.Module):
    """Grouped-query attention of this rank's heads over the KV cache it is given (`attention.attend`)."""

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

    def fuse(self) -> None:
        self.wqkv = fuse_weights(self.wq, self.wk, self.wv)

    def forward(self, x, layout: StepLayout, cos, sin, cache: tuple[torch.Tensor, torch.Tensor] | None,
                need_weights: bool = False):
        """x: (..., dim), the step's tokens in flat order; cos/sin: (tokens, head_dim // 2) of their positions;
        cache: this layer's (keys, values), written at the layout's slots before attending (None: training)."""
        if self.wqkv is not None:
            kv_width = self.n_local_kv_heads * self.head_dim
            q, k, v = local_linear(x, self.wqkv).split([self.n_local_heads * self.head_dim, kv_width, kv_width], -1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(q.reshape(1, -1, self.n_local_heads, self.head_dim), cos[None], sin[None])[0]
        k = apply_rope(k.reshape(1, -1, self.n_local_kv_heads, self.head_dim), cos[None], sin[None])[0]
        v = v.reshape(-1, self.n_local_kv_heads, self.head_dim)
        if cache is not None:
            write_cache(cache[0], cache[1], k, v, layout.slot_mapping)
        out, weights = attend(q, k, v, layout, cache, need_weights)
        return self.wo(out.view(*x.shape[:-1], -1)), weights


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

    def forward(self, x, layout, cos, sin, cache, need_weights=False):
        attn_out, weights = self.attention(self.attention_norm(x), layout, cos, sin, cache, need_weights)
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
    model-parallel world size (`args.validate`). `fuse()` and `post_init(max_batch_size, max_seq_len)` come before
    the weights are filled (they land in the fused stacks) and the first forward:
    `llama_dist.checkpoint.loader.load_model` does all of it. The runtime limits are the model's, not its args':
    `setup_caches` sets `max_batch_size` and `max_seq_len` (gpt-fast's `setup_caches`).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size)
        self.tie_embeddings()
        # The run's limits, set by setup_caches: sequences decoded together, positions per sequence.
        self.max_batch_size: int | None = None
        self.max_seq_len: int | None = None
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        # The cache Meta's `model(tokens, start_pos)` and the seed's `model(ids, input_pos)` use: max_batch_size rows
        # of max_seq_len positions, set up by setup_caches. The engine passes its own (or this one) to forward_step.
        self.cache: KVCache | None = None

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

    def post_init(self, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                  kv_cache: bool = True) -> None:
        """Set up what is derived rather than loaded: the tied output weight, then `setup_caches`.

        Call it after the weights have their final device and dtype (the tables and cache follow
        `tok_embeddings.weight`, which is never quantized); the loader calls it with the run's limits.
        """
        self.tie_embeddings()  # again: moving the model between devices makes new, separate parameters
        self.setup_caches(max_batch_size, max_seq_len, kv_cache)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, kv_cache: bool = True) -> None:
        """Take the run's limits: RoPE tables (float32) up to max_seq_len, and the default KV cache (model dtype)
        of max_batch_size x max_seq_len positions of this rank's KV heads per layer. kv_cache=False is for
        training, where every forward sees whole sequences from position 0.
        """
        check_runtime_limits(max_batch_size, max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.cache = None  # the old cache goes before the new one is allocated
        self.rope_cos, self.rope_sin = rope_tables(self.args, max_seq_len, self.tok_embeddings.weight.device)
        # One block per row: Meta's contiguous cache. The engine may replace it with a pool of smaller blocks.
        self.cache = self.new_cache(max_batch_size, max_seq_len) if kv_cache else None

    def new_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """An empty KV cache of `num_blocks` blocks of `block_size` positions for this rank's KV heads."""
        param, attention = self.tok_embeddings.weight, self.layers[0].attention
        return KVCache.allocate(self.args.n_layers, num_blocks, block_size, attention.n_local_kv_heads,
                                attention.head_dim, param.dtype, param.device)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        *,
        last_only: bool = False,
        gather: str = "all",
    ) -> TransformerOutput:
        """Logits for `tokens` (bsz, seqlen) placed at positions start_pos.. of rows 0..bsz-1 of the default cache.

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
        """
        self._check_ready(gather)
        bsz, seqlen = tokens.shape
        start_pos = _first_position(start_pos, seqlen)
        end = start_pos + seqlen
        rows, max_seq_len = self.max_batch_size, self.max_seq_len
        if bsz > rows or end > max_seq_len:
            raise ValueError(
                f"batch {bsz} x positions {start_pos}..{end} exceeds the cache "
                f"(max_batch_size={rows}, max_seq_len={max_seq_len})"
            )
        want_hidden = self.args.output_hidden_states if output_hidden_states is None else output_hidden_states
        want_attentions = self.args.output_attentions if output_attentions is None else output_attentions

        layout = StepLayout.uniform(bsz, seqlen, start_pos, self.cache, max_seq_len, tokens.device)
        h = self.tok_embeddings(tokens)
        hidden = [h] if want_hidden else None
        attentions = [] if want_attentions else None
        h = self._layers(h, layout, self.cache, hidden, attentions)
        if hidden is None:
            h = self.norm(h[:, -1:] if last_only else h)
        else:  # the last hidden state is the final norm's output, as in transformers
            h = hidden[-1] = self.norm(h)
            h = h[:, -1:] if last_only else h
        return TransformerOutput(
            logits=self._logits(h, gather),
            hidden_states=None if hidden is None else tuple(hidden),
            attentions=None if attentions is None else gather_heads(attentions),
        )

    def forward_step(self, tokens: torch.Tensor, layout: StepLayout, cache: KVCache, logits_indices: torch.Tensor,
                     gather: str = "rank0") -> torch.Tensor | None:
        """One engine step: `tokens` (total tokens,), a flat batch of rows laid out by `layout` in `cache`;
        float32 logits (len(logits_indices), vocab) of the tokens at `logits_indices` (None on ranks > 0 with
        gather="rank0")."""
        self._check_ready(gather)
        h = self._layers(self.tok_embeddings(tokens), layout, cache)
        if logits_indices.numel() == 0:  # a step of prompt chunks that sample nothing yet (the same on every rank)
            return h.new_empty((0, self.args.vocab_size), dtype=torch.float32)
        return self._logits(self.norm(h[logits_indices]), gather)

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        length: int | None = None,
        gather: str = "rank0",
        slots: torch.Tensor | None = None,
        cache: KVCache | None = None,
        tables: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """One decode step: token i (of `tokens`, (bsz,)) at position positions[i] of row i (of slots[i] when given)
        of `cache` (default: the model's), its rows laid out one after the other as for Meta's forward; float32
        logits (bsz, vocab) of the next token (None on ranks > 0 with gather="rank0"). tables: the rows' block
        tables instead (the engine's paged cache), (bsz, blocks) covering [0, length).

        Each row attends over cache positions [0, length) up to its own (length None: the whole cache, so
        nothing here depends on the positions' values: what a compiled step needs). The caller keeps positions
        below max_seq_len and length above them: checking would cost a device sync per step.
        """
        self._check_ready(gather)
        cache = self.cache if cache is None else cache
        if tokens.shape[0] > self.max_batch_size:
            raise ValueError(f"batch {tokens.shape[0]} exceeds the cache (max_batch_size={self.max_batch_size})")
        length = self.max_seq_len if length is None else length
        view = None
        if tables is None:  # Meta's rows, one after the other
            every = cache.contiguous_tables(self.max_batch_size, self.max_seq_len, tokens.device)
            tables = every[: tokens.shape[0]] if slots is None else every[slots]
            if slots is None:
                view = Strided(0, every.shape[1] * cache.block_size, tokens.shape[0])
        layout = StepLayout.decoding(positions, length, cache, tables, view)
        h = self._layers(self.tok_embeddings(tokens), layout, cache)
        return self._logits(self.norm(h), gather)

    def _layers(self, h, layout: StepLayout, cache: KVCache | None, hidden=None, attentions=None):
        """Every block over the step's tokens h (..., dim); records each block's output in `hidden` and its
        attention probabilities in `attentions` when given."""
        positions = layout.positions
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            h, weights = layer(h, layout, cos, sin, layer_cache, attentions is not None)
            if hidden is not None:
                hidden.append(h)
            if attentions is not None:
                attentions.append(weights)
        return h

    def _check_ready(self, gather: str) -> None:
        if self.rope_cos is None:
            raise RuntimeError("call post_init() before the first forward (load_model does)")
        if gather not in ("all", "rank0"):
            raise ValueError(f"gather must be 'all' or 'rank0', got {gather!r}")

    def _logits(self, h: torch.Tensor, gather: str) -> torch.Tensor | None:
        local_logits = self.output(h)
        logits = gather_last_dim_to_rank0(local_logits) if gather == "rank0" else gather_last_dim(local_logits)
        return None if logits is None else logits.float()
