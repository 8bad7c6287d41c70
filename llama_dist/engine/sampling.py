"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p). Runs on rank 0 only."""

from __future__ import annotations

import math
import numbers

import torch

from llama_dist.errors import RequestError


def check_sampling(temperature, top_p, max_gen_len=None) -> None:
    """Refuse settings sampling cannot use (RequestError naming the setting); max_gen_len None means "until the
    cache ends"."""
    if max_gen_len is not None and (
        not isinstance(max_gen_len, numbers.Integral) or isinstance(max_gen_len, bool) or max_gen_len < 1
    ):
        raise RequestError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
    if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not math.isfinite(temperature)
            or temperature < 0):
        raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability reaches top_p.

    probs: (bsz, vocab), rows summing to 1. Returns (bsz,) token ids.
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # A token stays when the mass of the more likely tokens is still short of top_p (the top one always stays).
    kept = sorted_probs.masked_fill(mass_before > top_p, 0.0)
    # Exponential race: token i wins (has the largest p_i / E_i, E_i ~ Exp(1)) with probability p_i / sum(p), so
    # the kept mass needs no renormalising, and unlike torch.multinomial nothing waits on the host (on GPUs).
    # A draw of exactly 0 (possible on CPU) would make a dropped token's 0 / 0 NaN, which argmax picks.
    race = torch.empty_like(kept).exponential_(generator=generator).clamp_min_(torch.finfo(kept.dtype).tiny)
    choice = (kept / race).argmax(dim=-1, keepdim=True)
    return torch.gather(order, -1, choice).squeeze(-1)


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row of `logits` (bsz, vocab): argmax when temperature == 0, else top-p sampling."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float()
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others to -inf
    # (probability 0) instead of overflowing every logit to inf (softmax NaN).
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    # (0 / a temperature that rounds to 0 in float32 would be NaN: the most likely tokens stay at 0.)
    probs = torch.softmax(torch.where(shifted == 0, 0.0, shifted / temperature), dim=-1)
    # Non-finite logits (bad weights) give NaN rows here; the caller refuses them, this only must not crash.
    probs = torch.nan_to_num(probs, nan=0.0).masked_fill(~torch.isfinite(logits).all(-1, keepdim=True), 1.0)
    return sample_top_p(probs, top_p, generator)
