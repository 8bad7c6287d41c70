"""Float32 parity with Meta's own reference implementation (llama_models.llama3.model.Transformer).

One random Llama 3.1-style checkpoint (GQA, rope_theta 500000, scaled RoPE, ffn_dim_multiplier): Meta's model
and ours run in the same 1-rank process; ours runs again on 2 ranks. Both the full-sequence forward and a
prefill followed by token-by-token decoding through each model's KV cache are compared.
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_models.llama3.model", reason="Meta's reference model (pip package llama-models) is not installed")

from helpers import logits_worker, rel_diff, tiny_args, write_checkpoint  # noqa: E402

from llama_dist.checkpoint.consolidated import shard_paths  # noqa: E402
from llama_dist.checkpoint.loader import load_model  # noqa: E402
from llama_dist.dist.groups import init_distributed  # noqa: E402
from llama_dist.dist.local_launch import run_local  # noqa: E402

TOLERANCE = 1e-5
ARGS = tiny_args(n_kv_heads=2, rope_theta=500000.0, use_scaled_rope=True, ffn_dim_multiplier=1.3, multiple_of=32)
MAX_SEQ_LEN, MAX_BATCH = 48, 3  # as logits_worker builds our model
DECODE_FROM = 5


def full_and_incremental(forward, tokens):
    """Logits of one full-sequence call, and of a prefill of DECODE_FROM positions then one token per call."""
    full = forward(tokens, 0)
    steps = [forward(tokens[:, :DECODE_FROM], 0)]
    steps += [forward(tokens[:, pos : pos + 1], pos) for pos in range(DECODE_FROM, tokens.shape[1])]
    return full, torch.cat(steps, dim=1)


def meta_and_ours_worker(ckpt: str, tokens: torch.Tensor) -> dict:
    init_distributed()  # Meta's fairscale layers need the model-parallel group too
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer as MetaTransformer

    torch.set_default_dtype(torch.float32)
    params = json.loads((Path(ckpt) / "params.json").read_text())
    meta = MetaTransformer(MetaArgs(**params, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH)).eval()
    (shard,) = shard_paths(ckpt)
    state = torch.load(shard, map_location="cpu", weights_only=True)
    state.pop("rope.freqs", None)  # Llama 2 shards carry it; Meta's model computes its own frequencies
    meta.load_state_dict(state, strict=True)
    meta_full, meta_incremental = full_and_incremental(meta, tokens)

    ours = load_model(ckpt, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH)
    ours_full, ours_incremental = full_and_incremental(lambda t, pos: ours(t, pos).logits, tokens)
    return {"meta_full": meta_full, "meta_incremental": meta_incremental,
            "ours_full": ours_full, "ours_incremental": ours_incremental}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("llama31_gqa")
    write_checkpoint(ckpt, ARGS, num_shards=1, seed=11)
    tokens = torch.randint(0, ARGS.vocab_size, (3, 12), generator=torch.Generator().manual_seed(12))
    (one_rank,) = run_local(meta_and_ours_worker, 1, str(ckpt), tokens, timeout_s=180)
    two_ranks = run_local(logits_worker, 2, [{"ckpt": str(ckpt), "tokens": tokens, "decode_from": DECODE_FROM}],
                          timeout_s=180)
    assert torch.equal(two_ranks[0][0]["full"], two_ranks[1][0]["full"])
    return {
        "meta": {"full": one_rank["meta_full"], "incremental": one_rank["meta_incremental"]},
        1: {"full": one_rank["ours_full"], "incremental": one_rank["ours_incremental"]},
        2: two_ranks[0][0],
    }


def test_meta_reference_is_self_consistent(outputs):
    meta = outputs["meta"]
    assert meta["full"].shape == (3, 12, ARGS.vocab_size)
    diff = rel_diff(meta["incremental"], meta["full"])
    print(f"\nMeta reference: KV-cache decode vs full forward, max relative diff {diff:.2e}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("mode", ["full", "incremental"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_matches_meta_reference(outputs, world_size, mode):
    ours, meta = outputs[world_size][mode], outputs["meta"][mode]
    assert ours.dtype == torch.float32 and ours.shape == meta.shape
    diff = rel_diff(ours, meta)
    print(f"\nllama_dist world={world_size} {mode}: max relative diff to Meta's Transformer {diff:.2e}")
    assert diff < TOLERANCE
