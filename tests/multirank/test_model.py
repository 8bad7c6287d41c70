"""Tensor-parallel logits at 1, 2 and 4 real gloo ranks against an independent float64 reference."""

import pytest
import torch
from helpers import logits_worker, reference_logits, rel_diff, tiny_args, write_checkpoint

from llama_dist.dist.local_launch import run_local

WORLD_SIZES = (1, 2, 4)
FP32_TOLERANCE = 1e-5

CONFIGS = {
    # name: (model args, shards, shard family, weight seed); the 2-shard ones reuse a 1-shard twin's weights
    "mha": (tiny_args(), 1, "llama3", 1),
    "gqa": (tiny_args(n_kv_heads=2), 1, "llama3", 2),  # 4 ranks > 2 KV heads: heads replicated
    "llama31": (tiny_args(n_kv_heads=2, rope_theta=500000.0, use_scaled_rope=True, ffn_dim_multiplier=1.3), 1, "llama3", 3),
    "llama3_2shards": (tiny_args(n_kv_heads=2), 2, "llama3", 2),
    "llama2_2shards": (tiny_args(), 2, "llama2", 1),
}
SHARDED_TWINS = {"llama3_2shards": "gqa", "llama2_2shards": "mha"}
LOW_PRECISION = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(7))
    ckpts, refs, jobs = {}, {}, []
    for name, (args, shards, family, seed) in CONFIGS.items():
        ckpts[name] = tmp_path_factory.mktemp(name)
        weights = write_checkpoint(ckpts[name], args, shards, family, seed=seed)
        refs[name] = reference_logits(weights, args, tokens)
        jobs.append({"ckpt": str(ckpts[name]), "tokens": tokens, "decode_from": 5})
    for dtype in LOW_PRECISION:
        jobs.append({"ckpt": str(ckpts["gqa"]), "tokens": tokens, "dtype": dtype})
    return tokens, ckpts, refs, jobs


@pytest.fixture(scope="module")
def results(setup):
    """{world_size: rank -> job -> outputs}: every configuration, computed by one launch per world size."""
    _, _, _, jobs = setup
    return {n: run_local(logits_worker, n, jobs, timeout_s=240) for n in WORLD_SIZES}


def _outputs(results, world_size, job_index):
    per_rank = [rank_results[job_index] for rank_results in results[world_size]]
    for other in per_rank[1:]:  # every rank must hold the same full-vocabulary logits
        assert torch.equal(other["full"], per_rank[0]["full"])
    return per_rank[0]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_logits_match_reference(setup, results, config, world_size):
    _, _, refs, _ = setup
    out = _outputs(results, world_size, list(CONFIGS).index(config))
    assert out["full"].dtype == torch.float32
    assert out["full"].shape == refs[config].shape
    diff = rel_diff(out["full"], refs[config])
    print(f"{config} world={world_size} max relative logit diff {diff:.2e}")
    assert diff < FP32_TOLERANCE


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_prefill_then_decode_equals_full_forward(setup, results, config, world_size):
    out = _outputs(results, world_size, list(CONFIGS).index(config))
    assert rel_diff(out["incremental"], out["full"]) < FP32_TOLERANCE


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
def test_low_precision_close_to_float32(setup, results, dtype, world_size):
    _, _, refs, _ = setup
    out = _outputs(results, world_size, len(CONFIGS) + list(LOW_PRECISION).index(dtype))
    assert out["full"].dtype == torch.float32  # logits are float32 whatever the model dtype
    diff = rel_diff(out["full"], refs["gqa"])
    print(f"{dtype} world={world_size} max relative logit diff {diff:.2e}")
    assert diff < LOW_PRECISION[dtype]


@pytest.mark.parametrize("sharded", list(SHARDED_TWINS))
def test_two_shard_checkpoint_equals_one_shard_at_every_world_size(results, sharded):
    names = list(CONFIGS)
    one_shard_single_rank = _outputs(results, 1, names.index(SHARDED_TWINS[sharded]))["full"]
    for n in WORLD_SIZES:
        diff = rel_diff(_outputs(results, n, names.index(sharded))["full"], one_shard_single_rank)
        print(f"{sharded} world={n} vs 1 shard at 1 rank: {diff:.2e}")
        assert diff < FP32_TOLERANCE


@pytest.mark.parametrize("rows", [1, 4, 8, 32, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products_match_float32_at_every_row_count(rows, dtype):
    """Whichever CPU kernel local_linear picks for the row count (mv, w @ x.T, float32 blocks), the product is
    the float32 one up to the dtype's rounding."""
    from llama_dist.model.kernels import local_linear

    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(2304, 96, generator=gen).to(dtype)  # more rows than one float32 block
    x = torch.randn(2, rows, 96, generator=gen).to(dtype)[:, : (rows + 1) // 2]
    expected = x.float() @ weight.float().T
    got = local_linear(x, weight)
    assert got.dtype == dtype and got.shape == expected.shape
    assert (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
