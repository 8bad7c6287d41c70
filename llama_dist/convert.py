"""Weights in Meta's layout -> Hugging Face transformers Llama (config and state dict), in memory.

Used to run the very same weights through `transformers` for comparisons (benchmarks, parity tests).
transformers is imported lazily: it is a test/benchmark dependency, not a runtime one.
"""

from __future__ import annotations

import torch

from llama_dist.config import ModelArgs


def hf_config(args: ModelArgs, **overrides):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope = {
            "rope_type": "llama3",
            "rope_theta": args.rope_theta,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    kwargs = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps,
        # Llama 3.1 scaling is defined relative to 8192 positions; HF wants the extended length above that.
        max_position_embeddings=max(args.max_seq_len, 131072) if args.use_scaled_rope else args.max_seq_len,
        rope_parameters=rope,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _rope_rows_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (x0,x1),(x2,x3)..; HF rotates halves (x0,x_{d/2}),...: reorder rows."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_state_dict(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Full weights with Meta's names -> LlamaForCausalLM's names and RoPE row order."""
    hf = {
        "model.embed_tokens.weight": weights["tok_embeddings.weight"],
        "model.norm.weight": weights["norm.weight"],
        "lm_head.weight": weights["output.weight"],
    }
    for i in range(args.n_layers):
        meta, ours = f"layers.{i}.", f"model.layers.{i}."
        hf[ours + "self_attn.q_proj.weight"] = _rope_rows_to_hf(weights[meta + "attention.wq.weight"], args.n_heads)
        hf[ours + "self_attn.k_proj.weight"] = _rope_rows_to_hf(weights[meta + "attention.wk.weight"], args.n_kv_heads)
        hf[ours + "self_attn.v_proj.weight"] = weights[meta + "attention.wv.weight"]
        hf[ours + "self_attn.o_proj.weight"] = weights[meta + "attention.wo.weight"]
        hf[ours + "mlp.gate_proj.weight"] = weights[meta + "feed_forward.w1.weight"]
        hf[ours + "mlp.up_proj.weight"] = weights[meta + "feed_forward.w3.weight"]
        hf[ours + "mlp.down_proj.weight"] = weights[meta + "feed_forward.w2.weight"]
        hf[ours + "input_layernorm.weight"] = weights[meta + "attention_norm.weight"]
        hf[ours + "post_attention_layernorm.weight"] = weights[meta + "ffn_norm.weight"]
    return hf


def transformers_model(weights: dict[str, torch.Tensor], args: ModelArgs, dtype=torch.float32, **config_overrides):
    """A LlamaForCausalLM holding `weights` (Meta names), in eval mode."""
    from transformers import LlamaForCausalLM

    config = hf_config(args, **config_overrides)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(hf_state_dict(weights, args), assign=True, strict=False)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KeyError(f"weights missing for {missing[:3]}")
    # Buffers (RoPE inverse frequencies) were created on the meta device, without values: rebuild them on CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(dtype).eval()
