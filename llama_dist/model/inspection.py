"""Looking inside a running model: tokens as strings, named activations.

    from llama_dist.model.inspection import run_with_cache, to_str_tokens, to_tokens
    tokens = to_tokens(llm, "the cat sat on")             # (1, n) LongTensor, <s> first
    logits, cache = run_with_cache(llm.model, tokens)
    cache["blocks.0.attn_out"]                            # (1, n, dim)

Attention probabilities of every head come from the model itself:
`model(tokens, output_attentions=True).attentions` (see `Transformer.forward`).
"""

from __future__ import annotations

import torch

from llama_dist.model.llama import Transformer

__all__ = ["run_with_cache", "to_str_tokens", "to_tokens"]


# ---- tokens ----------------------------------------------------------------------------------------------


def _tokenizer(tokenizer_or_llm):
    return getattr(tokenizer_or_llm, "tokenizer", tokenizer_or_llm)


def to_tokens(tokenizer_or_llm, text: str, bos: bool = True, device=None) -> torch.Tensor:
    """`text` as a (1, n) LongTensor of token ids, beginning with the BOS token when `bos`.

    device: where the tensor goes; by default the model's device when given a `Llama`, else the CPU.
    """
    tokenizer = _tokenizer(tokenizer_or_llm)
    if device is None and hasattr(tokenizer_or_llm, "model"):
        device = tokenizer_or_llm.model.tok_embeddings.weight.device
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
