"""The batched Sampler: sampled frequencies, greedy rows, seeded batch invariance, log-probabilities, bad logits."""

import math

import pytest
import torch

from llama_dist.engine.sampler import SampledBatch, Sampler, token_logprobs
from llama_dist.engine.sampling_params import SamplingParams

# Chosen so that for every setting below no token's "mass before" lies within 0.004 of top_p=0.8.
LOGITS = torch.tensor([2.0, 1.3, 0.8, 0.2, 0.0, -0.6, -1.1, -2.5])


def expected_probs(temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """The distribution the sampler should follow, in float64: softmax(logits / temperature), top_k most likely
    kept, then top_p over the top_k-renormalized mass (a token stays while the mass before it is < top_p),
    renormalized over the kept set."""
    p = torch.softmax(LOGITS.double() / temperature, dim=-1)
    order = torch.argsort(p, descending=True)
    sorted_p = p[order]
    if top_k > 0:
        sorted_p[top_k:] = 0
        sorted_p /= sorted_p.sum()
    mass_before = torch.cumsum(sorted_p, 0) - sorted_p
    assert (mass_before - top_p).abs().min() > 1e-3 or top_p == 1  # no borderline token in this test
    sorted_p[mass_before >= top_p] = 0
    out = torch.zeros_like(p)
    out[order] = sorted_p / sorted_p.sum()
    return out


@pytest.mark.parametrize(
    "temperature, top_p, top_k",
    [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.8, 0), (1.0, 1.0, 3), (0.7, 0.8, 0), (1.0, 0.8, 3), (0.7, 0.8, 3),
     (0.7, 1.0, -1)],
)
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_p, top_k):
    """N = 20000 draws (2000 identical rows x 10 calls) on a fixed 8-token vocabulary. Each token's frequency f must
    satisfy |f - p| <= 5 * sqrt(p (1 - p) / N) + 1e-3 (5 binomial standard deviations, plus slack for p near 0),
    where p is the expected probability; tokens the filters drop (p = 0) must never appear."""
    rows, calls = 2000, 10
    n = rows * calls
    sampler = Sampler("cpu", seed=1234)
    params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)] * rows
    counts = torch.zeros(len(LOGITS), dtype=torch.long)
    for _ in range(calls):
        out = sampler(LOGITS.repeat(rows, 1), params, [None] * rows)
        counts += torch.bincount(out.tokens, minlength=len(LOGITS))
    freq = counts.double() / n
    p = expected_probs(temperature, top_p, top_k)
    bound = 5 * torch.sqrt(p * (1 - p) / n) + 1e-3
    assert torch.all((freq - p).abs() <= bound), (freq, p)
    assert torch.all(counts[p == 0] == 0), counts


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    sampler = Sampler("cpu", seed=7)
    own = torch.Generator().manual_seed(3)
    engine_state, own_state = sampler.generator.get_state(), own.get_state()
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 4.9, 0.0, -2.0], [-1.0, -2.0, -0.5, -3.0]])
    params = [SamplingParams(temperature=0.0, top_p=0.5, top_k=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, seed=3)]
    out = sampler(logits, params, [None, None, own])
    assert out.tokens.tolist() == [1, 0, 2]
    assert torch.equal(sampler.generator.get_state(), engine_state)
    assert torch.equal(own.get_state(), own_state)


def test_each_sampled_row_draws_exactly_once():
    sampler = Sampler("cpu", seed=5)
    own = torch.Generator().manual_seed(11)
    params = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=11), SamplingParams(top_k=2)]
    sampler(torch.randn(4, 16), params, [None, None, own, None])
    # The engine's generator moved by two draws (rows 0 and 3, one call), the request's by one.
    engine_ref = torch.Generator().manual_seed(5)
    torch.rand(2, generator=engine_ref)
    own_ref = torch.Generator().manual_seed(11)
    torch.rand(1, generator=own_ref)
    assert torch.rand(4, generator=sampler.generator).tolist() == torch.rand(4, generator=engine_ref).tolist()
    assert torch.rand(4, generator=own).tolist() == torch.rand(4, generator=own_ref).tolist()


def _seeded_run(seed: int, steps: list[torch.Tensor], params: SamplingParams, mixed: bool) -> list[int]:
    """The tokens one seeded request gets over `steps`, alone, or at row 2 of a mixed batch."""
    gen = torch.Generator().manual_seed(seed)
    sampler = Sampler("cpu", seed=99)
    other = torch.Generator().manual_seed(seed + 1000)
    noise = torch.Generator().manual_seed(123)
    tokens = []
    for logits in steps:
        if not mixed:
            out = sampler(logits.unsqueeze(0), [params], [gen])
            tokens.append(out.tokens[0].item())
            continue
        batch = torch.randn(6, logits.numel(), generator=noise)
        batch[2] = logits
        batch_params = [SamplingParams(), SamplingParams(temperature=0.0), params,
                        SamplingParams(temperature=1.3, top_p=0.5, seed=seed + 1000),
                        SamplingParams(temperature=0.0, seed=5), SamplingParams(top_k=3, top_logprobs=4)]
        out = sampler(batch, batch_params, [None, None, gen, other, torch.Generator().manual_seed(5), None])
        tokens.append(out.tokens[2].item())
    return tokens


def test_seeded_rows_are_batch_invariant():
    steps = [torch.randn(50, generator=torch.Generator().manual_seed(s)) * 0.5 for s in range(12)]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=42)
    alone = _seeded_run(42, steps, params, mixed=False)
    assert _seeded_run(42, steps, params, mixed=True) == alone
    assert _seeded_run(43, steps, params, mixed=False) != alone


def test_logprobs_are_the_raw_log_softmax():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.5, top_logprobs=3), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.5, top_p=0.7, top_logprobs=5)]
    out = Sampler("cpu")(logits, params, [None] * 3)
    assert isinstance(out, SampledBatch)
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, raw.gather(-1, out.tokens.unsqueeze(-1)).squeeze(-1))
    scaled = torch.log_softmax(logits / 0.5, -1)[0, out.tokens[0]]
    assert not torch.isclose(out.logprobs[0], scaled)  # not of the temperature-scaled logits
    assert out.top_ids.shape == (3, 5) and out.top_ids.dtype == torch.long
    values, ids = torch.topk(raw, 5, dim=-1)
    assert torch.equal(out.top_ids, ids) and torch.allclose(out.top_logprobs, values)
    assert out.tokens.dtype == torch.long and out.logprobs.dtype == torch.float32


def test_no_top_logprobs_asked_gives_empty_columns():
    out = Sampler("cpu")(torch.randn(2, 10), [SamplingParams(logprobs=True), SamplingParams()], [None, None])
    assert out.top_ids.shape == (2, 0) and out.top_logprobs.shape == (2, 0)
    assert out.top_ids.dtype == torch.long and out.top_logprobs.dtype == torch.float32


def test_non_finite_rows_are_flagged_and_leave_the_others_alone():
    good = torch.randn(2, 20, generator=torch.Generator().manual_seed(1))
    bad = torch.zeros(3, 20)
    bad[0, 4] = float("nan")
    bad[1, 7] = float("inf")
    bad[2, :] = float("-inf")
    params = [SamplingParams(seed=8), SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_p=0.5),
              SamplingParams(temperature=0.0)]
    logits = torch.cat([good, bad])
    out = Sampler("cpu")(logits, params, [torch.Generator().manual_seed(8)] + [None] * 4)
    assert out.finite.tolist() == [True, True, False, False, False]
    assert torch.all((out.tokens >= 0) & (out.tokens < 20))
    alone = Sampler("cpu")(good[:1], params[:1], [torch.Generator().manual_seed(8)])
    assert out.tokens[0] == alone.tokens[0] and out.tokens[1] == good[1].argmax()
    assert torch.isfinite(out.logprobs[:2]).all()


@pytest.mark.parametrize("temperature", [1e-30, 1e-50])  # 1e-50 rounds to 0 in float32
def test_tiny_temperature_acts_like_greedy(temperature):
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(2)) * 10
    params = [SamplingParams(temperature=temperature, top_p=0.9)] * 64
    out = Sampler("cpu")(logits, params, [None] * 64)
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert out.finite.all() and not torch.isnan(out.logprobs).any()


def test_token_logprobs():
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 11, 5, 5])
    got = token_logprobs(logits, targets)
    assert got.shape == (4,) and got.dtype == torch.float32
    for i, t in enumerate(targets.tolist()):
        want = logits[i, t] - math.log(logits[i].exp().sum())
        assert abs(got[i].item() - want.item()) < 1e-5


def test_logit_bias_moves_sampling_but_not_logprobs():
    sampler = Sampler("cpu", seed=7)
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 4.9, 0.0, -2.0]])
    params = [SamplingParams(temperature=0.0, logit_bias={1: -100}, logprobs=True),
              SamplingParams(temperature=1.0, logit_bias={3: 100.0, 0: -100, 1: -100}, logprobs=True)]
    out = sampler(logits, params, [None, None])
    assert out.tokens.tolist() == [3, 3]  # the greedy token banned; a token all but forced
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1)[[0, 1], [3, 3]])
    assert torch.equal(sampler(logits, [SamplingParams(temperature=0.0)] * 2, [None, None]).tokens,
                       torch.tensor([1, 0]))  # no bias: the row's own argmax, the bias of another call gone


@pytest.mark.parametrize("bias", [{-1: 1.0}, {2: 101}, {2: "x"}, [1, 2]])
def test_bad_logit_bias_is_a_request_error(bias):
    from llama_dist.errors import RequestError

    with pytest.raises(RequestError, match="logit_bias"):
        SamplingParams(logit_bias=bias)
