"""Looking inside a running model: tokens as strings, named activations, loading from a checkpoint file.

    from llama_dist.inspection import run_with_cache, to_str_tokens, to_tokens
    tokens = to_tokens(llm, "the cat sat on")             # (1, n) LongTensor, <s> first
    logits, cache = run_with_cache(llm.model, tokens)
    cache["blocks.0.attn_out"]                            # (1, n, dim)

Attention probabilities of every head come from the model itself:
`model(tokens, output_attentions=True).attentions` (see `Transformer.forward`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llama_dist.checkpoint import (
    IGNORED_KEYS,
    SHARD_PATTERN,
    CheckpointError,
    ShardSet,
    check_world_size,
    read_model_args,
    shard_paths,
)
from llama_dist.config import ConfigError, ModelArgs
from llama_dist.distributed import model_parallel_world_size
from llama_dist.model import Transformer
from llama_dist.parallel import shard_specs

__all__ = ["load_pretrained", "run_with_cache", "to_str_tokens", "to_tokens"]


# ---- tokens ----------------------------------------------------------------------------------------------


def _tokenizer(tokenizer_or_llm):
    return getattr(tokenizer_or_llm, "tokenizer", tokenizer_or_llm)


def to_tokens(tokenizer_or_llm, text: str, bos: bool = True, device=None) -> torch.Tensor:
    """`text` as a (1, n) LongTensor of token ids, beginning with the BOS token when `bos`.

    device: where the tensor goes; by default the model's device when given a `Llama`, else the CPU.
    """
    tokenizer = _tokenizer(tokenizer_or_llm)
    if device is None and hasattr(tokenizer_or_llm, "model"):
        device = tokenizer_or_llm.model.output.weight.device
    return torch.tensor([tokenizer.encode(text, bos=bos, eos=False)], dtype=torch.long, device=device)


def to_str_tokens(tokenizer_or_llm, ids) -> list[str]:
    """One string per token id: what each token adds to the decoded text, special tokens by name ("<s>").

    ids: a list, or a tensor of shape (n,) or (1, n). Joined, the strings of ordinary tokens are exactly
    the decoded text (leading spaces included). A character spread over several byte tokens appears whole
    on its last byte token; the earlier ones get "".
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"ids must be one sequence, shape (n,) or (1, n); got {tuple(ids.shape)}")
        ids = ids.tolist()
    tokenizer = _tokenizer(tokenizer_or_llm)
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    strings: list[str] = []
    run: list[int] = []  # ordinary tokens since the last special one, decoded together
    decoded = ""
    for position, token in enumerate(ids):
        token = int(token)
        if token in names:
            strings.append(names[token])
            run, decoded = [], ""
            continue
        run.append(token)
        text = tokenizer.decode(run)
        next_is_ordinary = position + 1 < len(ids) and int(ids[position + 1]) not in names
        if text.endswith("\ufffd") and next_is_ordinary:
            strings.append("")  # an unfinished multi-byte character: wait for its remaining bytes
            continue
        strings.append(text[len(decoded):] if text.startswith(decoded) else tokenizer.decode([token]))
        decoded = text
    return strings


# ---- activations -----------------------------------------------------------------------------------------


def run_with_cache(
    model: Transformer, tokens: torch.Tensor, start_pos: int = 0, *, attentions: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `model` on `tokens` and return (logits, cache of named activations), each (bsz, seqlen, dim).

    Names, for every layer i:
      "embed"                  token embeddings (= blocks.0.resid_pre)
      "blocks.{i}.resid_pre"   the residual stream entering block i
      "blocks.{i}.attn_in"     attention_norm(resid_pre), the attention's input
      "blocks.{i}.attn_out"    the attention's output (after wo)
      "blocks.{i}.resid_mid"   resid_pre + attn_out
      "blocks.{i}.mlp_in"      ffn_norm(resid_mid), the feed-forward's input
      "blocks.{i}.mlp_out"     the feed-forward's output (after w2)
      "blocks.{i}.resid_post"  resid_mid + mlp_out (= blocks.{i+1}.resid_pre)
      "final_norm"             norm(last resid_post), what the vocabulary projection sees
      "blocks.{i}.attn.pattern"  with attentions=True: (bsz, n_heads, seqlen, start_pos + seqlen) probabilities

    Every entry is full width and identical on every rank: wo and w2 are row-parallel, so their outputs are
    already all-reduced, and the embedding is all-reduced too. Every rank must call this (the forward runs
    collectives). Recorded by forward hooks, removed before returning; the model's computation is unchanged
    (except that attentions=True computes attention with explicit softmax). Logits are full-vocabulary, float32.
    """
    cache: dict[str, torch.Tensor] = {}

    def output_of(name, index=None):
        def hook(module, args, output):
            cache[name] = (output if index is None else output[index]).detach()

        return hook

    def input_of(name):
        def hook(module, args):
            cache[name] = args[0].detach()

        return hook

    hooks = [model.tok_embeddings.register_forward_hook(output_of("embed"))]
    for i, layer in enumerate(model.layers):
        p = f"blocks.{i}."
        hooks += [
            layer.register_forward_pre_hook(input_of(p + "resid_pre")),
            layer.attention_norm.register_forward_hook(output_of(p + "attn_in")),
            layer.attention.register_forward_hook(output_of(p + "attn_out", index=0)),
            layer.ffn_norm.register_forward_pre_hook(input_of(p + "resid_mid")),
            layer.ffn_norm.register_forward_hook(output_of(p + "mlp_in")),
            layer.feed_forward.register_forward_hook(output_of(p + "mlp_out")),
            layer.register_forward_hook(output_of(p + "resid_post", index=0)),
        ]
    hooks.append(model.norm.register_forward_hook(output_of("final_norm")))
    try:
        with torch.no_grad():
            out = model(tokens, start_pos, output_hidden_states=False, output_attentions=attentions)
    finally:
        for hook in hooks:
            hook.remove()
    for i, pattern in enumerate(out.attentions or ()):
        cache[f"blocks.{i}.attn.pattern"] = pattern
    return out.logits, cache


# ---- loading ---------------------------------------------------------------------------------------------


# What identifies a model's math (ffn_hidden_dim stands for multiple_of and ffn_dim_multiplier, which can
# spell the same width in several ways).
_IDENTITY = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
             "use_scaled_rope")


def _check_params_json(config: ModelArgs, params_path: Path) -> None:
    """A params.json beside the weights must describe the model `config` describes (the weights' shapes alone
    do not: Llama 3 and 3.1 8B have the same shapes but different RoPE)."""
    if not params_path.is_file():
        return
    stored = ModelArgs.from_params_json(params_path)
    differing = [
        f"{name}={getattr(config, name)!r} but {params_path} says {getattr(stored, name)!r}"
        for name in _IDENTITY
        if getattr(config, name) != getattr(stored, name)
        and not (name == "vocab_size" and (stored.vocab_size < 1 or config.vocab_size < 1))  # the weights decide
    ]
    if differing:
        raise ConfigError("the config does not match the checkpoint: " + "; ".join(differing))


@torch.no_grad()
def load_pretrained(
    config: ModelArgs | None, path, device="cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """`Transformer.from_pretrained`: see there."""
    path = Path(path)
    if path.is_dir():
        paths = shard_paths(path)
        if config is None:
            config = read_model_args(path)
    elif path.is_file():
        if SHARD_PATTERN.fullmatch(path.name):
            siblings = [p for p in path.parent.iterdir() if SHARD_PATTERN.fullmatch(p.name)]
            if len(siblings) > 1:
                raise CheckpointError(
                    f"{path} is one of {len(siblings)} shards of a checkpoint: pass the directory {path.parent}"
                )
        if config is None:
            config = read_model_args(path.parent)
        paths = [path]
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_params_json(config, paths[0].parent / "params.json")

    shards = ShardSet(paths)
    if config.vocab_size < 1:  # Llama 2 style: every shard holds all rows of the embedding
        config = dataclasses.replace(config, vocab_size=shards.tensor(0, "tok_embeddings.weight").shape[0])
    world = model_parallel_world_size()
    config.validate(world)
    check_world_size(len(paths), world, path)
    model = Transformer.build(config, device=device, dtype=dtype)

    # As checkpoint.load_weights, for an explicit list of shard files.
    specs = shard_specs(model)
    for name, param in model.named_parameters():
        spec = specs[name]
        value = shards.read(name, spec.full_shape if spec is not None else tuple(param.shape), spec)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{path}: {name!r} slice has shape {tuple(value.shape)}, model expects {tuple(param.shape)}"
            )
        param.copy_(value)
    unexpected = set(shards.shard(0)) - set(specs) - IGNORED_KEYS
    if unexpected:
        raise CheckpointError(f"{paths[0]} has tensors this model does not use: {sorted(unexpected)[:5]}")
    return model
