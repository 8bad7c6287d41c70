"""The weight inventory: every tensor of a Llama checkpoint in Meta's names, its full shape and how tensor
parallelism splits it. Formats map their own names onto these (checkpoint/hf.py); the loader, convert, quantize
and the memory check read this table; `random_weights` fills it for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llama_dist.config import ModelArgs

# How a weight is split across the ranks of the model-parallel group (model/parallel.py holds the layers):
COLUMN = "column"  # by output rows (dim 0)
ROW = "row"  # by input columns (dim 1); the partial products are all-reduced
VOCAB = "vocab"  # the embedding, by vocabulary rows (dim 0)
KV_HEADS = "kv_heads"  # by whole KV heads, a head replicated when ranks outnumber them (dim 0)
REPLICATED = "replicated"  # a whole copy on every rank

# One transformer block's tensors, inside `layers.N.`: (name, split, multiplied by activations).
LAYER_WEIGHTS = (
    ("attention.wq.weight", COLUMN, True),
    ("attention.wk.weight", KV_HEADS, True),
    ("attention.wv.weight", KV_HEADS, True),
    ("attention.wo.weight", ROW, True),
    ("feed_forward.w1.weight", COLUMN, True),
    ("feed_forward.w2.weight", ROW, True),
    ("feed_forward.w3.weight", COLUMN, True),
    ("attention_norm.weight", REPLICATED, False),
    ("ffn_norm.weight", REPLICATED, False),
)
# Outside the blocks; `output.weight` is absent when tied to the embedding.
TOP_WEIGHTS = (
    ("tok_embeddings.weight", VOCAB, False),
    ("norm.weight", REPLICATED, False),
    ("output.weight", COLUMN, True),
)
SPLIT_DIM = {COLUMN: 0, ROW: 1, VOCAB: 0, KV_HEADS: 0, REPLICATED: None}
# The block weights multiplied by activations: what weight-only quantization covers (with `output.weight`).
LAYER_MATMUL_WEIGHTS = tuple(name for name, _, matmul in LAYER_WEIGHTS if matmul)


@dataclass(frozen=True)
class WeightSpec:
    name: str  # Meta's name
    shape: tuple[int, ...]  # full, unsplit
    split: str  # COLUMN, ROW, VOCAB, KV_HEADS or REPLICATED
    matmul: bool  # multiplied by activations (a quantizable linear weight)

    @property
    def split_dim(self) -> int | None:
        return SPLIT_DIM[self.split]


def _shape(name: str, args: ModelArgs) -> tuple[int, ...]:
    d, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    return {
        "attention.wq.weight": (args.n_heads * hd, d),
        "attention.wk.weight": (args.n_kv_heads * hd, d),
        "attention.wv.weight": (args.n_kv_heads * hd, d),
        "attention.wo.weight": (d, args.n_heads * hd),
        "feed_forward.w1.weight": (ffn, d),
        "feed_forward.w2.weight": (d, ffn),
        "feed_forward.w3.weight": (ffn, d),
        "attention_norm.weight": (d,),
        "ffn_norm.weight": (d,),
        "tok_embeddings.weight": (args.vocab_size, d),
        "norm.weight": (d,),
        "output.weight": (args.vocab_size, d),
    }[name]


def layer_weights(args: ModelArgs) -> list[WeightSpec]:
    """One block's tensors, named inside the block (`attention.wq.weight`); every block has the same."""
    return [WeightSpec(name, _shape(name, args), split, matmul) for name, split, matmul in LAYER_WEIGHTS]


def top_weights(args: ModelArgs) -> list[WeightSpec]:
    """The tensors outside the blocks; a model with tied embeddings has no `output.weight` of its own."""
    return [WeightSpec(name, _shape(name, args), split, matmul) for name, split, matmul in TOP_WEIGHTS
            if not (name == "output.weight" and args.tie_word_embeddings)]


def weight_inventory(args: ModelArgs) -> dict[str, WeightSpec]:
    """Meta's name -> WeightSpec of every tensor of the model `args` describes, embedding first, in Meta's order."""
    top = {spec.name: spec for spec in top_weights(args)}
    inventory = {"tok_embeddings.weight": top.pop("tok_embeddings.weight")}
    for i in range(args.n_layers):
        for spec in layer_weights(args):
            inventory[f"layers.{i}.{spec.name}"] = WeightSpec(f"layers.{i}.{spec.name}", spec.shape, spec.split,
                                                            spec.matmul)
    inventory.update(top)
    return inventory


def block_weight_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `attention.wq.weight`; a name outside the blocks stays as it is."""
    if name.startswith("layers."):
        return name.split(".", 2)[2]
    return name


def split_of(name: str) -> str | None:
    """How the inventory splits the tensor `name` (Meta's name, in a block or not); None for a name it lacks."""
    table = dict((n, split) for n, split, _ in LAYER_WEIGHTS + TOP_WEIGHTS)
    return table.get(block_weight_name(name))


def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> full (unsplit) shape of every tensor of the model `args` describes, as Meta's checkpoints name them.

    A model with tied embeddings has no `output.weight` of its own: it is `tok_embeddings.weight`.
    """
    return {name: spec.shape for name, spec in weight_inventory(args).items()}


def random_weights(args: ModelArgs, seed: int = 0, dtype=torch.float32, device="cpu",
                   on_tensor: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Full random weights for `args`, scaled so activations keep their size through the layers, on the CPU.

    device: where they are drawn (a GPU draws an 8B model in seconds, the CPU in minutes); each seed's values
    depend on it. on_tensor: called with each tensor's size in bytes once drawn (a progress bar).
    """
    gen = torch.Generator(device).manual_seed(seed)
    weights = {}
    for name, shape in weight_shapes(args).items():
        weights[name] = draw_weight(shape, gen, device).to(dtype).cpu()
        if on_tensor is not None:
            on_tensor(weights[name].nbytes)
    return weights


def draw_weight(shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """One random float32 weight of `shape` on `device`: norm gains near 1, as in trained models; matrices scaled
    so activations keep their size through the layers."""
    if len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=generator, device=device)
    return torch.randn(shape, generator=generator, device=device) * shape[-1] ** -0.5
