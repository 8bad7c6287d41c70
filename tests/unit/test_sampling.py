"""Greedy and top-p sampling statistics on fixed logits, through the engine's batched Sampler (every row from one
generator, as rows without a seed of their own draw)."""

import torch

from llama_dist.engine.sampler import Sampler
from llama_dist.engine.sampling_params import SamplingParams


def sample_next(logits, temperature, top_p, generator=None):
    sampler = Sampler("cpu")
    if generator is not None:
        sampler.generator = generator
    params = SamplingParams(temperature=temperature, top_p=top_p)
    return sampler(logits.float(), [params] * logits.shape[0], [None] * logits.shape[0]).tokens


def sample_top_p(probs, top_p, generator=None):
    return sample_next(torch.log(probs), 1.0, top_p, generator)

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample_next(logits, 0.0, 0.9).tolist() == [1, 0]


def test_tiny_top_p_is_greedy():
    gen = torch.Generator().manual_seed(0)
    draws = sample_top_p(PROBS.repeat(2000, 1), 1e-6, gen)
    assert torch.all(draws == 0)


def test_sampled_frequencies_match_the_truncated_distribution():
    # top_p=0.8 keeps 0.5, 0.25 and 0.15 (mass before 0.15 is 0.75 < 0.8; before 0.07 it is 0.9 > 0.8).
    gen = torch.Generator().manual_seed(0)
    n = 40000
    draws = sample_top_p(PROBS.repeat(n, 1), 0.8, gen)
    freq = torch.bincount(draws, minlength=5).float() / n
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    assert torch.allclose(freq, expected, atol=0.01), freq
    assert freq[3:].sum() == 0


def test_top_p_one_samples_the_whole_distribution():
    gen = torch.Generator().manual_seed(1)
    n = 40000
    draws = sample_top_p(PROBS.repeat(n, 1), 1.0, gen)
    freq = torch.bincount(draws, minlength=5).float() / n
    assert torch.allclose(freq, PROBS, atol=0.01), freq


def test_temperature_sharpens_and_flattens():
    logits = torch.log(PROBS).repeat(20000, 1)
    cold = sample_next(logits, 0.3, 1.0, torch.Generator().manual_seed(2))
    hot = sample_next(logits, 3.0, 1.0, torch.Generator().manual_seed(2))
    assert (cold == 0).float().mean() > 0.85  # p0 ** (1/0.3) dominates
    assert (hot == 0).float().mean() < 0.35  # close to uniform


def test_same_generator_seed_same_draws():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    a = sample_next(logits, 0.8, 0.9, torch.Generator().manual_seed(5))
    b = sample_next(logits, 0.8, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
