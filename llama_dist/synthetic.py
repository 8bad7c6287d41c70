"""Random weights with the names and shapes of a Meta checkpoint: for tests and benchmarks that need no
trained model (write them with `formats.consolidated.write_consolidated`)."""

from __future__ import annotations

import torch

from llama_dist.config import ModelArgs


def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> full (unsplit) shape of every tensor of the model `args` describes, as Meta's checkpoints name them.

    A model with tied embeddings has no `output.weight` of its own: it is `tok_embeddings.weight`.
    """
    d, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.n_kv_heads * hd, d),
            p + "attention.wv.weight": (args.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (ffn, d),
            p + "feed_forward.w2.weight": (d, ffn),
            p + "feed_forward.w3.weight": (ffn, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    shapes["norm.weight"] = (d,)
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def random_weights(args: ModelArgs, seed: int = 0, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Full random weights for `args`, scaled so activations keep their size through the layers, on the CPU.

    device: where they are drawn (a GPU draws an 8B model in seconds, the CPU in minutes); each seed's values
    depend on it.
    """
    gen = torch.Generator(device).manual_seed(seed)
    weights = {}
    for name, shape in weight_shapes(args).items():
        if len(shape) == 1:  # norm gains near 1, as in trained models
            weight = 1 + 0.1 * torch.randn(shape, generator=gen, device=device)
        else:
            weight = torch.randn(shape, generator=gen, device=device) * shape[-1] ** -0.5
        weights[name] = weight.to(dtype).cpu()
    return weights
