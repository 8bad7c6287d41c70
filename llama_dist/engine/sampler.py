"""Rank 0's batched sampler: one pass over every sequence's next-token logits, each row with its own
SamplingParams (greedy, temperature, top_k, top_p), plus the raw log-probabilities the requests asked for.

Everything stays on the device: no .item()/.tolist() and no branching on tensor values, so on a GPU nothing waits
on the host; the caller moves the SampledBatch to the host once. Python branches look only at the params."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.speculative import accept_greedy, accept_sampled
from llama_dist.engine.transfer import to_device


@dataclass
class SampledBatch:
    """Device tensors, one row per sampled sequence."""

    tokens: torch.Tensor  # (rows,) int64
    logprobs: torch.Tensor  # (rows,) float32: raw log-softmax (before temperature and filters) at the chosen token
    top_ids: torch.Tensor  # (rows, K) int64, K = the largest top_logprobs over the rows (0 columns when none asked)
    top_logprobs: torch.Tensor  # (rows, K) float32: raw log-softmax of the K most likely tokens, descending
    finite: torch.Tensor  # (rows,) bool: the row's logits were all finite (if False its token is meaningless)


@dataclass
class VerifiedRow:
    """What one speculative row gave, on the host: the kept guesses and the model's own token after them, each
    token's raw log-probability and top alternatives when asked, and whether the logits were all finite."""

    tokens: list[int]
    logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None
    finite: bool


def target_scores(logits: torch.Tensor, targets: list[int], k: int) -> torch.Tensor:
    """(len(targets), 1 + 2k): each row's raw log-probability of its target, then its k most likely token ids and
    their log-probabilities (prompt logprobs, verified guesses)."""
    logits, targets = logits[: len(targets)], to_device(torch.tensor(targets), logits.device)
    if not k:
        return token_logprobs(logits, targets).unsqueeze(-1)
    logp = torch.log_softmax(logits.float(), dim=-1)  # once, for the targets and the top k alike
    top_logprobs, top_ids = torch.topk(logp, k, dim=-1)
    chosen = logp.gather(-1, targets.long().unsqueeze(-1))
    return torch.cat([chosen.double(), top_ids.double(), top_logprobs.double()], dim=-1)  # ids exact in float64


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Raw log-softmax of `logits` (n, vocab) at `targets` (n,) -> (n,) float32 (e.g. prompt logprobs)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


class Sampler:
    """Chooses one token per row. Greedy rows (temperature 0) take the argmax and draw no random number; every
    other row draws exactly one uniform: from its request's generator when it has one (seeded requests), else
    from the engine's generator, all such rows in one call. Inverse-CDF sampling with that one uniform makes a
    seeded row's tokens depend only on its seed and its logits, not on the rest of the batch."""

    def __init__(self, device, seed: int = 1):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
        allowed: torch.Tensor | None = None,
    ) -> SampledBatch:
        """allowed: (rows, vocab) bool, the tokens each row may take (its grammar's), or None: any."""
        rows, vocab = logits.shape
        if len(params) != rows or len(generators) != rows:
            raise ValueError(f"{rows} rows of logits but {len(params)} params and {len(generators)} generators")
        logits = logits.float()
        # A NaN or an infinity anywhere makes the row's sum non-finite (a sum is 30x cheaper than isfinite().all()
        # over a 128k vocabulary; finite logits would need ~1e33 each to overflow it).
        finite = torch.isfinite(logits.sum(dim=-1))
        # Non-finite rows (bad weights) are replaced by zeros so that nothing below produces NaN or crashes; the
        # engine ends those requests with an error, so their token only has to be a valid id.
        clean = torch.where(finite.unsqueeze(-1), logits, 0.0)
        if any(p.logit_bias for p in params):
            clean = self._biased(clean, params)
        if allowed is not None:
            clean = clean.masked_fill(~allowed, float("-inf"))
        tokens = clean.max(dim=-1).indices  # the first maximum, as argmax, at a third of its cost on CPUs
        if not all(p.greedy for p in params):
            sampled = self._sample(clean, params, generators)
            greedy_mask = self._to_device([p.greedy for p in params], torch.bool)
            tokens = torch.where(greedy_mask, tokens, sampled)
        tokens = torch.where(finite, tokens, 0)

        # Log-probabilities are the model's own: log-softmax of the raw logits, before temperature and filters
        # (computed only when a row asks for them).
        k = min(max(p.top_logprobs for p in params), vocab)
        if not any(p.logprobs or p.top_logprobs for p in params):
            empty_ids = torch.empty((rows, 0), dtype=torch.long, device=logits.device)
            return SampledBatch(tokens, logits.new_zeros(rows), empty_ids, logits.new_empty((rows, 0)), finite)
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if k > 0:
            top_logprobs, top_ids = torch.topk(logp, k, dim=-1)  # sorted, descending
        else:
            top_logprobs = logp.new_empty((rows, 0))
            top_ids = torch.empty((rows, 0), dtype=torch.long, device=logits.device)
        return SampledBatch(tokens, chosen, top_ids, top_logprobs, finite)

    def verify(self, rows: list[tuple[torch.Tensor, list[int], SamplingParams, torch.Generator | None,
                                      torch.Tensor | None]]) -> list[VerifiedRow]:
        """Speculative decoding: what each sequence gains from its (k+1)-token row, given (logits (k+1, vocab) at
        its newest token and its k guesses, the guesses, its params, its generator, the (k, vocab) distributions a
        draft model drew the guesses from, or None when they were drawn with certainty: prompt lookup, a greedy
        draft). Exact for greedy and sampled rows alike (`engine.speculative`). Greedy rows are decided in one pass
        over all rows (one host read), sampled rows one by one; log-probabilities, when asked, in one more."""
        raw = torch.cat([logits for logits, *_ in rows]).float()
        row_params = [params for logits, _, params, _, _ in rows for _ in range(logits.shape[0])]
        finite = torch.isfinite(raw.sum(dim=-1))
        clean = torch.where(finite.unsqueeze(-1), raw, 0.0)
        if any(params.logit_bias for _, _, params, _, _ in rows):
            clean = self._biased(clean, row_params)
        argmax_and_finite = torch.stack([clean.max(dim=-1).indices, finite.long()]).tolist()
        starts = list(itertools.accumulate((logits.shape[0] for logits, *_ in rows), initial=0))
        verified = []
        for (logits, draft, params, generator, draft_probs), offset in zip(rows, starts):
            size = logits.shape[0]
            if params.greedy:
                tokens = accept_greedy(argmax_and_finite[0][offset : offset + size], draft)
            else:
                uniforms = torch.rand(size, generator=generator or self.generator, device=self.device)
                probs = self.probabilities(clean[offset : offset + size], [params] * size)
                tokens = accept_sampled(probs, draft, uniforms, draft_probs)
            verified.append(VerifiedRow(tokens, None, None, all(argmax_and_finite[1][offset : offset + size])))
        params = [params for _, _, params, _, _ in rows]
        asking = [i for i, p in enumerate(params) if p.logprobs or p.top_logprobs]
        if asking:  # the verified tokens' raw log-probabilities (and top alternatives), all rows in one pass
            k = max(params[i].top_logprobs for i in asking)
            index = [starts[i] + j for i in asking for j in range(len(verified[i].tokens))]
            scores = iter(target_scores(raw[index], [t for i in asking for t in verified[i].tokens], k).tolist())
            for i in asking:
                top_k, scored = params[i].top_logprobs, [next(scores) for _ in verified[i].tokens]
                verified[i].logprobs = [row[0] for row in scored]
                if top_k:
                    verified[i].top = [list(zip(map(int, row[1 : 1 + top_k]), row[1 + k : 1 + k + top_k]))
                                       for row in scored]
        return verified

    def probabilities(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """(rows, vocab): each row's sampling distribution after temperature, top-k and top-p, summing to 1."""
        kept, order = self._kept(logits, params)
        probs = torch.zeros_like(kept).scatter_(-1, order, kept)
        return probs / probs.sum(dim=-1, keepdim=True)

    def _sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Inverse-CDF sampling of every row (greedy rows too, harmlessly: the caller ignores them)."""
        vocab = logits.shape[-1]
        kept, order = self._kept(logits, params)
        # The kept mass needs no renormalising: scale the uniform by it instead. Dropped tokens add nothing to the
        # cumulative sum, so the first index reaching the target is always a kept token with probability > 0.
        cum = torch.cumsum(kept, dim=-1)
        target = self._uniforms(params, generators).unsqueeze(-1) * cum[:, -1:]
        index = torch.searchsorted(cum, target).clamp_(max=vocab - 1)  # clamp: rounding past the end
        return order.gather(-1, index).squeeze(-1)

    def _kept(self, logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's probabilities after temperature, top-k and top-p, sorted descending (those dropped are 0, the
        rest not renormalised), and the token order of that sort."""
        vocab = logits.shape[-1]
        # Greedy rows get temperature 1 only so that their (unused) row stays well-defined. top_p 1 becomes inf
        # so that rounding in the cumulative sum (mass a hair over 1) can never drop a tail token.
        temperature = self._to_device([p.temperature if not p.greedy else 1.0 for p in params], torch.float32)
        top_p = self._to_device([p.top_p if p.top_p < 1 else float("inf") for p in params], torch.float32)
        top_k = self._to_device([p.top_k if p.top_k > 0 else vocab for p in params], torch.long)

        # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others to -inf
        # (probability 0) instead of overflowing every logit to inf (softmax NaN). A temperature that rounds to 0
        # in float32 would make 0 / 0 NaN, so the most likely tokens stay at exactly 0.
        shifted = logits - logits.max(dim=-1, keepdim=True).values
        scaled = torch.where(shifted == 0, 0.0, shifted / temperature.unsqueeze(-1))
        probs = torch.softmax(scaled, dim=-1)

        # Sort once, descending: top_k and top_p each keep a prefix of this order. Stable, so that equal
        # probabilities always come in token order, whatever else is in the batch.
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
        after_k = sorted_probs.masked_fill(rank >= top_k.unsqueeze(-1), 0.0)
        # top_p after top_k, over the mass top_k kept (as vLLM and Hugging Face do): a token stays when the mass
        # of the more likely kept tokens is still below top_p of that mass. The top token always stays.
        cum_k = torch.cumsum(after_k, dim=-1)
        mass_before = cum_k - after_k
        keep = mass_before < top_p.unsqueeze(-1) * cum_k[:, -1:]
        keep[:, 0] = True
        return after_k.masked_fill(~keep, 0.0), order

    def _biased(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Each row's logit_bias added to its logits (a copy; ids past the vocabulary are ignored)."""
        vocab = logits.shape[-1]
        entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias.items()
                   if token < vocab]
        if not entries:
            return logits
        rows, tokens, biases = zip(*entries)
        return logits.index_put((self._to_device(list(rows), torch.long), self._to_device(list(tokens), torch.long)),
                                self._to_device(list(biases), torch.float32), accumulate=True)

    def _uniforms(self, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
        """(rows,) uniforms in [0, 1): one draw per non-greedy row, from its own generator when it has one,
        else from the engine's generator (all of those in one call, in row order); greedy rows get 0 and draw
        nothing, so greedy requests never move any random stream."""
        seeded_rows = [i for i, (p, g) in enumerate(zip(params, generators)) if not p.greedy and g is not None]
        engine_rows = [i for i, (p, g) in enumerate(zip(params, generators)) if not p.greedy and g is None]
        draws = [torch.rand(1, generator=generators[i], device=self.device) for i in seeded_rows]
        if engine_rows:
            draws.append(torch.rand(len(engine_rows), generator=self.generator, device=self.device))
        draws.append(torch.zeros(1, device=self.device))  # the greedy rows' entry
        # source[i]: which entry of the concatenated draws row i takes (the last, 0, unless it drew one).
        source = [len(seeded_rows) + len(engine_rows)] * len(params)
        for j, i in enumerate(seeded_rows + engine_rows):
            source[i] = j
        return torch.cat(draws).index_select(0, self._to_device(source, torch.long))

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host list on the device without a host sync."""
        return to_device(torch.tensor(values, dtype=dtype), self.device)
