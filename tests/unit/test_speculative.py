"""Speculative decoding's pieces: prompt lookup, the greedy rule, and the rejection sampler, whose output must have
the model's distribution whatever was guessed (measured on a small fixed vocabulary)."""

import pytest
import torch

from llama_dist.engine.sampler import Sampler
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.speculative import NgramProposer, SpeculativeConfig, accept_greedy, accept_sampled
from llama_dist.errors import ConfigError


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    lookup = NgramProposer(ngram_min=1, ngram_max=3)
    assert lookup.propose([5, 6, 7, 8, 9, 5, 6, 7], 3) == [8, 9, 5]  # the 3-gram 5 6 7
    assert lookup.propose([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]  # the latest of two matches of 1 2
    assert lookup.propose([1, 2, 3, 4, 9, 3, 4, 2, 3], 2) == [4, 9]  # 3-gram absent: the 2-gram 2 3
    assert lookup.propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert lookup.propose([7, 7, 7], 5) == [7]  # the match may overlap the end (as far as tokens go)
    assert NgramProposer(ngram_min=2, ngram_max=2).propose([4, 1, 9, 1], 3) == []  # 1-grams not looked up
    # Token-aligned: the bytes of 256 (00 01 00 00) contain those of 1 at an odd offset.
    assert NgramProposer(1, 1).propose([256, 5, 1], 2) == []
    assert lookup.propose([3, 8, 3], 0) == []


def test_greedy_acceptance_keeps_the_guesses_up_to_the_first_miss():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]  # all kept, then the model's next
    assert accept_greedy([4, 9, 6, 7], [4, 5, 6]) == [4, 9]  # the model's own token at the miss
    assert accept_greedy([3, 5, 6, 7], [4, 5, 6]) == [3]
    assert accept_greedy([8], []) == [8]


def _first_token_frequencies(p: torch.Tensor, draft: list[int], q: torch.Tensor | None, trials: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(p.shape[-1])
    for _ in range(trials):
        tokens = accept_sampled(p, draft, torch.rand(len(draft) + 1, generator=generator), q)
        counts[tokens[0]] += 1
    return counts / trials


TRIALS = 20_000
BOUND = 0.02  # on each token's frequency: over 5 standard deviations at 20,000 trials (at most 0.0035 each)


@pytest.mark.parametrize("guess", [0, 2, 4])  # the likeliest token, a middling one, one with little mass
def test_prompt_lookup_rejection_sampling_keeps_the_models_distribution(guess):
    p = torch.softmax(torch.tensor([[2.0, 0.5, 1.0, -1.0, -3.0, 0.0]] * 3), dim=-1)
    frequencies = _first_token_frequencies(p, [guess, 1], None, TRIALS)
    assert (frequencies - p[0]).abs().max() < BOUND, (frequencies, p[0])


def test_draft_model_rejection_sampling_keeps_the_models_distribution():
    p = torch.softmax(torch.tensor([[2.0, 0.5, 1.0, -1.0, -3.0, 0.0]] * 2), dim=-1)
    q = torch.softmax(torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0, -1.0]]), dim=-1)  # a draft that disagrees
    draws = torch.multinomial(q[0], TRIALS, replacement=True, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    counts = torch.zeros(6)
    for guess in draws.tolist():  # the guess itself drawn from q, as a draft model would
        counts[accept_sampled(p, [guess], torch.rand(2, generator=generator), q)[0]] += 1
    assert (counts / TRIALS - p[0]).abs().max() < BOUND, (counts / TRIALS, p[0])


def test_a_fully_kept_run_ends_with_a_token_from_the_last_position():
    p = torch.zeros(3, 4)
    p[0, 1] = p[1, 2] = p[2, 3] = 1.0  # certain: the guesses 1, 2 are kept and 3 follows
    assert accept_sampled(p, [1, 2], torch.tensor([0.99, 0.99, 0.5])) == [1, 2, 3]
    p[1] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the second guess has no mass: rejected, 3 instead
    assert accept_sampled(p, [1, 2], torch.tensor([0.0, 0.0, 0.7])) == [1, 3]


def test_sampling_probabilities_follow_temperature_top_k_and_top_p():
    sampler = Sampler("cpu")
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=2),
              SamplingParams(temperature=1.0, top_p=0.5)]
    probs = sampler.probabilities(logits, params)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(3))
    assert torch.allclose(probs[0], torch.softmax(logits[0], dim=-1))
    assert torch.allclose(probs[1], torch.tensor([torch.e ** 2 / (torch.e ** 2 + 1), 1 / (torch.e ** 2 + 1), 0, 0]))
    assert probs[2].tolist() == [1.0, 0.0, 0.0, 0.0]  # the top token alone holds over half the mass


@pytest.mark.parametrize("config, message", [
    (SpeculativeConfig(method="draft"), "needs --draft_ckpt_dir"),
    (SpeculativeConfig(draft_quantize="int4"), "go with --speculative draft"),
    (SpeculativeConfig("draft", draft_quantize="int3"), "--draft_quantize must be int8 or int4"),
    (SpeculativeConfig(method="medusa"), "must be one of ngram"),
    (SpeculativeConfig(num_tokens=0), "num_tokens must be a positive integer"),
    (SpeculativeConfig(ngram_min=3, ngram_max=2), "ngram_min (3) must not be above ngram_max (2)"),
])
def test_bad_speculative_settings_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.check()


def test_rows_are_sampled_by_inverse_cdf_and_never_land_on_a_token_without_mass():
    from llama_dist.engine.speculative import sample_rows

    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]])
    assert sample_rows(weights, torch.tensor([0.0, 0.5])) == [1, 0]
    assert sample_rows(weights, torch.tensor([0.2499, 0.9])) == [1, 0]
    assert sample_rows(weights, torch.tensor([0.25, 0.0])) == [3, 0]
    assert sample_rows(weights, torch.tensor([1.0 - 1e-9, 1.0 - 1e-9])) == [3, 0]  # the top end: the last with mass
