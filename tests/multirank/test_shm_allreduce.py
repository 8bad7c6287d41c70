"""The shared-memory all-reduce CPU ranks on one host use instead of gloo's TCP loopback."""

import os
import time

import pytest
import torch

from llama_dist.dist.groups import init_distributed, model_parallel_group
from llama_dist.dist.local_launch import run_local
from llama_dist.dist.shm_allreduce import PeerLostError, create_for_group, usable_here

pytestmark = pytest.mark.skipif(not usable_here(), reason="shared-memory all-reduce needs x86-64 and /dev/shm")


def sums_worker(sizes: list[int]) -> list[torch.Tensor]:
    ctx = init_distributed()
    segment = create_for_group(model_parallel_group(), timeout_s=30, capacity=4096)
    assert segment is not None
    gen = torch.Generator().manual_seed(ctx.rank)
    results = []
    for i, n in enumerate(sizes):  # back to back, so the alternating buffers get reused many times
        dtype = torch.bfloat16 if i % 2 else torch.float32
        x = torch.randn(n, generator=gen).to(dtype)
        results.append((x.clone(), segment.all_reduce_(x)))
    return results


def test_sums_are_correct_and_bit_identical_on_every_rank():
    sizes = [1, 7, 2048, 4096, 3, 100] * 5
    for world in (2, 4):
        per_rank = run_local(sums_worker, world, sizes, timeout_s=120)
        for i in range(len(sizes)):
            inputs = [per_rank[r][i][0] for r in range(world)]
            expected = torch.stack([t.float() for t in inputs]).sum(0)
            outputs = [per_rank[r][i][1] for r in range(world)]
            for out in outputs[1:]:
                assert torch.equal(out, outputs[0])
            tol = 1e-6 if outputs[0].dtype == torch.float32 else 2e-2
            assert torch.allclose(outputs[0].float(), expected, rtol=tol, atol=tol)


def absent_peer_worker(rank1_sleep_s: float) -> tuple[str, float]:
    """Rank 1 never joins the all-reduce: it sleeps, then exits; rank 0 reports how its wait ended."""
    ctx = init_distributed()
    segment = create_for_group(model_parallel_group(), timeout_s=2, capacity=16)
    if ctx.rank == 1:
        time.sleep(rank1_sleep_s)
        return "", 0.0
    start = time.monotonic()
    try:
        segment.all_reduce_(torch.ones(4))
    except PeerLostError as exc:
        return str(exc), time.monotonic() - start
    return "no error", time.monotonic() - start


def test_a_stalled_rank_times_out():
    message, waited = run_local(absent_peer_worker, 2, 6.0, timeout_s=60)[0]
    assert "Timed out waiting 2 s for peer rank(s) [1]" in message
    assert 2.0 <= waited < 4.0


def test_a_rank_that_exits_is_noticed_quickly():
    message, waited = run_local(absent_peer_worker, 2, 0.0, timeout_s=60)[0]
    assert "peer rank(s) [1] exited" in message
    assert waited < 2.0  # before the timeout


def test_segment_name_is_gone_after_setup():
    before = set(os.listdir("/dev/shm"))
    run_local(sums_worker, 2, [4], timeout_s=60)
    leftovers = {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("llama_dist_")}
    assert not leftovers
