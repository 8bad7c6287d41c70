"""Rotary position embeddings (RoPE) in Meta's layout, with Llama 3.1's long-context frequency scaling."""

from __future__ import annotations

import math

import torch

from llama_dist.config import ModelArgs


def _llama31_scaled_frequencies(freqs: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Llama 3.1 long-context rule: slow low frequencies down by the scaling factor, keep high ones, blend the band
    between smoothly (Meta's 8, 1, 4, 8192 unless a Hugging Face config gives its own, e.g. Llama 3.2's 32)."""
    scale_factor, low_freq_factor = args.rope_scaling_factor, args.rope_low_freq_factor
    high_freq_factor, original_context = args.rope_high_freq_factor, args.rope_original_context
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, freqs)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / scale_factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def rope_tables(args: ModelArgs, max_seq_len: int, device=None):
    """cos and sin of every (position, frequency) pair up to max_seq_len (the run's limit), float32, shape
    (max_seq_len, head_dim // 2)."""
    head_dim, theta = args.head_dim, args.rope_theta
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if args.use_scaled_rope:
        freqs = _llama31_scaled_frequencies(freqs, args)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by the position's angles (Meta's layout).

    x: (bsz, seqlen, heads, head_dim); cos/sin: (bsz or 1, seqlen, head_dim // 2), the angles of each token's
    position.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
