"""The one loader (loading.py): a checkpoint's config resolved and checked once, and this rank's slice built and
filled at 2 ranks from any shard layout, with a named error for every checkpoint that does not fit.
"""

import dataclasses

import pytest
import torch
from helpers import edit_params, raises_naming, reference_logits, rel_diff, tiny_args, write_checkpoint

from llama_dist.checkpoint import consolidated
from llama_dist.checkpoint.loader import load_model, open_checkpoint
from llama_dist.config import ModelArgs
from llama_dist.dist.groups import init_distributed, shutdown_distributed
from llama_dist.dist.local_launch import run_local
from llama_dist.errors import CheckpointError, ConfigError
from llama_dist.llm import Llama

TOKENS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))


# ---- the config: from params.json, or given and checked against it ----------------------------------------


def test_missing_params_json(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    (tmp_path / "params.json").unlink()
    with raises_naming(FileNotFoundError, tmp_path / "params.json"):
        open_checkpoint(tmp_path)


def test_invalid_params_json(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    (tmp_path / "params.json").write_text('{"dim": 64, "n_layers": ')
    with raises_naming(ConfigError, tmp_path / "params.json", "not valid JSON"):
        open_checkpoint(tmp_path)


def test_params_json_must_be_an_object(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    (tmp_path / "params.json").write_text("[64, 2, 4]")
    with raises_naming(ConfigError, tmp_path / "params.json", "list"):
        open_checkpoint(tmp_path)


def test_unknown_runtime_argument_is_refused(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    with raises_naming(ConfigError, "max_seqlen"):
        open_checkpoint(tmp_path, max_seqlen=64)


def test_params_json_extra_meta_keys_are_ignored(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    edit_params(tmp_path, quantization_args={"scheme": "int4"}, vision_chunk_size=-1)
    checkpoint = open_checkpoint(tmp_path, max_seq_len=64, max_batch_size=2)
    assert (checkpoint.args.dim, checkpoint.args.vocab_size) == (64, 128)
    assert (checkpoint.max_seq_len, checkpoint.max_batch_size) == (64, 2)


def test_the_model_takes_the_runtime_limits_and_keeps_to_them(tmp_path):
    """The limits given to load_model are the model's (ModelArgs describes the model only): they size its RoPE
    tables and default cache, and a forward past them, or a limit that is not a positive integer, is one error."""
    write_checkpoint(tmp_path, tiny_args())
    edit_params(tmp_path, max_seq_len=4096, max_batch_size=32)  # not params.json fields: ignored like other extras
    init_distributed()
    try:
        with raises_naming(ConfigError, "max_batch_size must be a positive integer, got 0"):
            load_model(tmp_path, max_seq_len=8, max_batch_size=0)
        model = load_model(tmp_path, max_seq_len=8, max_batch_size=2)
        assert (model.max_seq_len, model.max_batch_size) == (8, 2)
        assert model.rope_cos.shape[0] == 8 and (model.cache.num_blocks, model.cache.block_size) == (2, 8)
        assert model(TOKENS, 1).logits.shape == (2, 7, 128)  # positions 1..7: the last one the cache holds
        with raises_naming(ValueError, "positions 2..9", "max_seq_len=8"):
            model(TOKENS, 2)
        with raises_naming(ValueError, "batch 3", "max_batch_size=2"):
            model(TOKENS[[0, 1, 0]], 0)
        model.setup_caches(max_batch_size=3, max_seq_len=16)  # gpt-fast's way to change them after loading
        assert model(TOKENS[[0, 1, 0]], 9).logits.shape == (3, 7, 128)
        with raises_naming(ConfigError, "max_seq_len must be a positive integer, got 1.5"):
            model.setup_caches(max_batch_size=3, max_seq_len=1.5)
    finally:
        shutdown_distributed()


def test_a_given_config_must_match_params_json(tmp_path):
    args = tiny_args(n_kv_heads=2)
    write_checkpoint(tmp_path, args)
    with raises_naming(ConfigError, "use_scaled_rope=True", "params.json"):
        open_checkpoint(tmp_path, dataclasses.replace(args, use_scaled_rope=True))
    with raises_naming(ConfigError, "rope_theta"):
        open_checkpoint(tmp_path / "consolidated.00.pth", dataclasses.replace(args, rope_theta=500000.0))


def test_one_shard_of_several_is_refused(tmp_path):
    write_checkpoint(tmp_path, tiny_args(), num_shards=2)
    with raises_naming(CheckpointError, "pass the directory"):
        open_checkpoint(tmp_path / "consolidated.01.pth", tiny_args())
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "missing.pth", tiny_args())


def test_a_lone_pth_file_takes_its_vocabulary_from_the_weights(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    (tmp_path / "params.json").unlink()
    assert open_checkpoint(tmp_path / "consolidated.00.pth", tiny_args(vocab_size=-1)).args.vocab_size == 128


def test_llama_build_reads_params_json_and_validates_once(tmp_path, spm_model_path, monkeypatch):
    """One build resolves the config once: params.json read, config validated, shards listed and matched to the
    world size, each exactly once."""
    from helpers import SPM_VOCAB

    write_checkpoint(tmp_path, tiny_args(vocab_size=SPM_VOCAB))
    counts = {"params.json": 0, "validate": 0, "checkpoint_files": 0, "check_world_size": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    from_params_json = ModelArgs.from_params_json.__func__
    monkeypatch.setattr(ModelArgs, "from_params_json", classmethod(counted("params.json", from_params_json)))
    monkeypatch.setattr(ModelArgs, "validate", counted("validate", ModelArgs.validate))
    monkeypatch.setattr(consolidated, "checkpoint_files", counted("checkpoint_files", consolidated.checkpoint_files))
    monkeypatch.setattr(consolidated, "check_world_size", counted("check_world_size", consolidated.check_world_size))
    try:
        llm = Llama.build(tmp_path, spm_model_path, max_seq_len=32, max_batch_size=2)
        assert (llm.model.max_seq_len, llm.model.max_batch_size) == (32, 2)
    finally:
        shutdown_distributed()
    assert counts == {"params.json": 1, "validate": 1, "checkpoint_files": 1, "check_world_size": 1}


# ---- load_model on 2 ranks: every case in one launch, one job per checkpoint --------------------------------------------------------------------------------


def load_jobs_worker(jobs: dict[str, str]) -> dict[str, dict]:
    """On each rank: load every checkpoint; return its error (type, message) or logits for TOKENS."""
    init_distributed()
    results = {}
    for name, ckpt in jobs.items():
        try:
            model = load_model(ckpt, max_seq_len=16, max_batch_size=2)
        except Exception as exc:  # noqa: BLE001 - the test inspects the type
            results[name] = {"error": type(exc), "message": str(exc)}
            continue
        results[name] = {"logits": model(TOKENS, 0).logits, "vocab_size": model.args.vocab_size}
    return results


def _replicate_kv_heads(ckpt_dir, weights, args, num_shards):
    """Rewrite wk/wv so shard i holds KV head i // (num_shards / n_kv_heads) whole (Meta's replicated layout)."""
    copies = num_shards // args.n_kv_heads
    for i in range(num_shards):
        path = ckpt_dir / f"consolidated.{i:02d}.pth"
        shard = torch.load(path, weights_only=True)
        for name in [n for n in shard if ".attention.wk." in n or ".attention.wv." in n]:
            shard[name] = weights[name].split(args.head_dim)[i // copies].clone()
        torch.save(shard, path)


@pytest.fixture(scope="module")
def load_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    jobs, refs = {}, {}

    def ckpt(name):
        jobs[name] = str(root / name)
        return root / name

    base = tiny_args(vocab_size=96)
    write_checkpoint(ckpt("dim_mismatch"), base)
    edit_params(root / "dim_mismatch", dim=32)
    write_checkpoint(ckpt("ffn_mismatch"), base)
    edit_params(root / "ffn_mismatch", ffn_dim_multiplier=1.3)  # FFN width 224 instead of the weights' 192
    write_checkpoint(ckpt("extra_tensor"), base)
    shard = torch.load(root / "extra_tensor" / "consolidated.00.pth", weights_only=True)
    shard["layers.0.attention.wqkv.bias"] = torch.zeros(3)
    torch.save(shard, root / "extra_tensor" / "consolidated.00.pth")
    write_checkpoint(ckpt("three_shards"), tiny_args(dim=96, n_heads=6, n_kv_heads=6, vocab_size=96, multiple_of=48), 3)
    write_checkpoint(ckpt("odd_vocab"), tiny_args(vocab_size=97))
    write_checkpoint(ckpt("vocab_claims_half"), base, 2)  # vocab-split shards of 48 rows
    edit_params(root / "vocab_claims_half", vocab_size=48)

    weights = write_checkpoint(ckpt("llama2_rope_freqs"), base, 2, family="llama2")
    refs["llama2_rope_freqs"] = reference_logits(weights, base, TOKENS)
    gqa = tiny_args(n_kv_heads=2, vocab_size=96)
    weights = write_checkpoint(ckpt("replicated_kv_4_shards"), gqa, 4, seed=5)
    _replicate_kv_heads(root / "replicated_kv_4_shards", weights, gqa, 4)
    refs["replicated_kv_4_shards"] = reference_logits(weights, gqa, TOKENS)
    return jobs, refs


@pytest.fixture(scope="module")
def load_results(load_setup):
    jobs, _ = load_setup
    per_rank = run_local(load_jobs_worker, 2, jobs, timeout_s=120)
    for name in jobs:  # every rank must reach the same outcome
        assert per_rank[0][name].keys() == per_rank[1][name].keys(), name
    return per_rank[0]


@pytest.mark.parametrize(
    "job, exc_type, names",
    [
        ("dim_mismatch", CheckpointError, ["tok_embeddings.weight", "(96, 64)", "(96, 32)", "params.json"]),
        ("ffn_mismatch", CheckpointError, ["layers.0.feed_forward.w1.weight", "(192, 64)", "(224, 64)"]),
        ("extra_tensor", CheckpointError, ["consolidated.00.pth", "layers.0.attention.wqkv.bias"]),
        ("three_shards", CheckpointError, ["three_shards", "3 shard(s)", "2 rank(s)"]),
        ("odd_vocab", ConfigError, ["odd_vocab/params.json", "vocab_size=97", "world size 2"]),
    ],
)
def test_load_model_errors(load_results, job, exc_type, names):
    result = load_results[job]
    assert result.get("error") is exc_type, result
    for name in names:
        assert name in result["message"], (name, result["message"])


def test_params_matching_one_shards_rows_is_an_error(load_results):
    assert load_results["vocab_claims_half"].get("error") is CheckpointError, load_results["vocab_claims_half"]


def test_llama2_checkpoint_loads_ignoring_rope_freqs(load_setup, load_results):
    _, refs = load_setup
    result = load_results["llama2_rope_freqs"]
    assert "error" not in result, result.get("message")
    assert result["vocab_size"] == 96  # params.json says -1
    assert rel_diff(result["logits"], refs["llama2_rope_freqs"]) < 1e-5


def test_replicated_kv_head_checkpoint_loads(load_setup, load_results):
    _, refs = load_setup
    result = load_results["replicated_kv_4_shards"]
    assert "error" not in result, result.get("message")
    assert rel_diff(result["logits"], refs["replicated_kv_4_shards"]) < 1e-5
