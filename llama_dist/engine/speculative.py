"""Speculative decoding: a cheap guess of a sequence's next tokens, checked by the model in one step.

A step of a decoding sequence normally computes its newest token and samples one more. With speculation, a
proposer guesses the k tokens after it, the step computes the newest token and the k guesses as one (k+1)-token
row (a chunk, like a prompt's), and the verifier keeps the guesses the model agrees with and adds one token of the
model's own: the one at the first disagreement, or the one after the last guess when all were kept. A step then
gives 1 to k+1 tokens for little more than the cost of one (decoding at batch 1 is bound by reading the weights).

Exact: greedy rows keep a guess only when it is the model's argmax there, so their output is the output without
speculation. Sampled rows use rejection sampling (Leviathan et al., Chen et al., 2023) against the proposer's
distribution q: a guess x is kept with probability min(1, p(x) / q(x)), else a token is drawn from the normalised
max(0, p - q); p is the model's distribution after temperature, top-k and top-p. Prompt lookup proposes with
certainty (q is one-hot at x): x is kept with probability p(x), else drawn from p without x. Every output token
then has the model's distribution, though not the tokens a run without speculation draws.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from llama_dist.errors import ConfigError

__all__ = ["SpeculativeConfig", "NgramProposer", "accept_greedy", "accept_sampled", "sample_from", "sample_rows"]

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup: no extra model) or "draft" (a draft model: `engine.draft`). num_tokens:
    guesses per step at most. ngram_max, ngram_min: the lengths of the sequence's last tokens looked up earlier in
    it, longest first. draft_ckpt_dir: the draft model's checkpoint (None: the target's own, then with
    draft_quantize, e.g. "int4", a copy every user has)."""

    method: str = "ngram"
    num_tokens: int = 4
    ngram_max: int = 4
    ngram_min: int = 2
    draft_ckpt_dir: str | None = None
    draft_quantize: str | None = None

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--speculative must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_tokens", "ngram_max", "ngram_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.ngram_min > self.ngram_max:
            raise ConfigError(f"ngram_min ({self.ngram_min}) must not be above ngram_max ({self.ngram_max})")
        if self.method == "draft" and self.draft_ckpt_dir is None and self.draft_quantize is None:
            raise ConfigError("--speculative draft needs --draft_ckpt_dir (a smaller model with the same tokenizer) "
                              "or --draft_quantize (an int4 or int8 copy of the model itself)")
        if self.method != "draft" and (self.draft_ckpt_dir is not None or self.draft_quantize is not None):
            raise ConfigError("--draft_ckpt_dir and --draft_quantize go with --speculative draft")
        if self.draft_quantize not in (None, "int8", "int4"):
            raise ConfigError(f"--draft_quantize must be int8 or int4, got {self.draft_quantize!r}")


class NgramProposer:
    """Prompt lookup: find the sequence's last n tokens earlier in its prompt and output (n from ngram_max down to
    ngram_min, the latest occurrence first) and propose what followed them there."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that may follow `tokens`; none when no n-gram of its end occurs before."""
        if k < 1 or len(tokens) < self.ngram_min + 1:
            return []
        haystack = array("i", tokens).tobytes()  # bytes.rfind searches in C; a match must be token-aligned
        width = array("i").itemsize
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            needle = haystack[-n * width:]
            end = len(haystack) - width  # the match must end before the last token (the suffix itself)
            while True:
                at = haystack.rfind(needle, 0, end)
                if at < 0:
                    break
                if at % width == 0:
                    follow = at // width + n
                    return tokens[follow : follow + k]
                end = at + len(needle) - 1  # misaligned: look further left
        return []


def accept_greedy(targets: list[int], draft: list[int]) -> list[int]:
    """The tokens a greedy row gains: the guesses up to the first that is not the model's argmax, then the model's
    own token there. targets: the argmax at each of the k+1 positions."""
    kept = 0
    while kept < len(draft) and draft[kept] == targets[kept]:
        kept += 1
    return draft[:kept] + [targets[kept]]


def accept_sampled(probs: torch.Tensor, draft: list[int], uniforms: torch.Tensor,
                   draft_probs: torch.Tensor | None = None) -> list[int]:
    """Rejection sampling. probs: (k+1, vocab) the model's distribution at each position (rows sum to 1);
    draft_probs: (k, vocab) the proposer's, None when it proposed with certainty (prompt lookup); uniforms: (k+1,)
    draws in [0, 1), one per guess and one for the last token. Returns the kept guesses and one token more."""
    k = len(draft)
    if k:
        index = torch.arange(k, device=probs.device)
        ids = torch.tensor(draft, device=probs.device)
        p = probs[index, ids]
        ratio = p if draft_probs is None else (p / draft_probs[index, ids]).clamp(max=1.0)
        rejected = (uniforms[:k] >= ratio).tolist()
    else:
        rejected = []
    kept = rejected.index(True) if True in rejected else k
    last = probs[kept]
    if kept < k:  # the residual: what p has beyond q
        if draft_probs is None:
            last = last.clone()
            last[draft[kept]] = 0.0
        else:
            last = (last - draft_probs[kept]).clamp(min=0.0)
    return draft[:kept] + [sample_from(last, uniforms[k])]


def sample_from(weights: torch.Tensor, uniform: torch.Tensor) -> int:
    """A token drawn from (vocab,) non-negative `weights` (not necessarily normalised) with one uniform in [0, 1)."""
    return sample_rows(weights.unsqueeze(0), uniform.reshape(1))[0]


def sample_rows(weights: torch.Tensor, uniforms: torch.Tensor) -> list[int]:
    """One token per row of (rows, vocab) non-negative `weights` (rows need not be normalised), drawn with (rows,)
    uniforms in [0, 1) by inverse CDF; one host read for all rows."""
    cumulative = torch.cumsum(weights, dim=-1)
    target = (uniforms * cumulative[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cumulative, target, right=True).squeeze(-1)
    # Rounding at the top end may pass the last token with mass: it is the furthest a draw can go.
    last = weights.shape[-1] - 1 - (weights > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(tokens, last).tolist()
