"""Meta checkpoints: a clear error for every broken input, and exact slices from any shard layout.

Most tests call the reading functions in this process (they need no process group). Loading a model needs
one, so every `load_model` case runs in a single 2-rank launch (`load_results`), one job per checkpoint.
"""

import contextlib
import json
import os
import re
import shlex
import signal

import pytest
import torch

from llama_dist.checkpoint import (
    CheckpointError,
    ShardSet,
    check_world_size,
    load_model,
    random_meta_weights,
    read_model_args,
    save_meta_checkpoint,
    shard_paths,
)
from llama_dist.config import ConfigError
from llama_dist.distributed import init_distributed
from llama_dist.local_launch import run_local
from llama_dist.parallel import ShardSpec, meta_split_dim
from multirank import RunsShellCommand, params_of, reference_logits, rel_diff, tiny_args, write_checkpoint

TOKENS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))


def raises_naming(exc_type, *names):
    """pytest.raises(exc_type) whose message must contain every one of `names` (paths, values, tensor names)."""
    return pytest.raises(exc_type, match="(?s)" + "".join(f"(?=.*{re.escape(str(n))})" for n in names))


def edit_params(ckpt_dir, **changes):
    path = ckpt_dir / "params.json"
    params = json.loads(path.read_text())
    params.update(changes)
    path.write_text(json.dumps(params))


# ---- missing or malformed files ------------------------------------------------------------------------


def test_missing_checkpoint_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    with raises_naming(FileNotFoundError, missing):
        shard_paths(missing)
    with raises_naming(FileNotFoundError, missing):
        read_model_args(missing)


def test_missing_params_json(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    (tmp_path / "params.json").unlink()
    with raises_naming(FileNotFoundError, tmp_path / "params.json"):
        read_model_args(tmp_path)


def test_invalid_params_json(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    (tmp_path / "params.json").write_text('{"dim": 64, "n_layers": ')
    with raises_naming(ConfigError, tmp_path / "params.json", "not valid JSON"):
        read_model_args(tmp_path)


def test_params_json_must_be_an_object(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    (tmp_path / "params.json").write_text("[64, 2, 4]")
    with raises_naming(ConfigError, tmp_path / "params.json", "list"):
        read_model_args(tmp_path)


def test_unknown_runtime_argument_is_refused(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    with raises_naming(ConfigError, "max_seqlen"):
        read_model_args(tmp_path, max_seqlen=64)


def test_params_json_extra_meta_keys_are_ignored(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    edit_params(tmp_path, quantization_args={"scheme": "int4"}, vision_chunk_size=-1)
    args = read_model_args(tmp_path, max_seq_len=64, max_batch_size=2)
    assert (args.dim, args.vocab_size, args.max_seq_len, args.max_batch_size) == (64, 128, 64, 2)


def test_no_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(params_of(tiny_args())))
    with raises_naming(FileNotFoundError, tmp_path, "consolidated.NN.pth"):
        shard_paths(tmp_path)


def test_gap_in_shard_numbering(tmp_path):
    for i in (0, 2):
        torch.save({}, tmp_path / f"consolidated.{i:02d}.pth")
    with raises_naming(FileNotFoundError, "consolidated.01.pth"):
        shard_paths(tmp_path)


def test_shards_are_listed_in_numeric_order(tmp_path):
    for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 11):
        torch.save({}, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "consolidated.00.pth.tmp").write_text("not a shard")
    assert [p.name for p in shard_paths(tmp_path)] == [f"consolidated.{i:02d}.pth" for i in range(12)]


def test_truncated_shard(tmp_path):
    write_checkpoint(tmp_path, tiny_args(), family="llama2")  # vocab -1: read_model_args opens the shard too
    shard = tmp_path / "consolidated.00.pth"
    os.truncate(shard, shard.stat().st_size // 2)
    with raises_naming(CheckpointError, shard, "truncated or corrupt"):
        ShardSet(shard_paths(tmp_path)).read("norm.weight", (64,), None)
    with raises_naming(CheckpointError, shard):
        read_model_args(tmp_path)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"norm.weight": torch.ones(64), "exploit": RunsShellCommand(f"touch {shlex.quote(str(marker))}")}
    shard = tmp_path / "consolidated.00.pth"
    torch.save(payload, shard)
    (tmp_path / "params.json").write_text(json.dumps({**params_of(tiny_args()), "vocab_size": -1}))

    with raises_naming(CheckpointError, shard, "refused to unpickle"):
        ShardSet(shard_paths(tmp_path)).read("norm.weight", (64,), None)
    with raises_naming(CheckpointError, shard):
        read_model_args(tmp_path)
    assert not marker.exists()

    # The payload is live: an unrestricted torch.load would have run it (it only touches a file here).
    torch.load(shard, weights_only=False)
    assert marker.exists()


# ---- shapes that cannot run on a world size ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, world_size, names",
    [
        (tiny_args(), 3, ["n_heads=4", "world size 3"]),
        (tiny_args(dim=96, n_heads=12, n_kv_heads=3), 2, ["n_kv_heads=3", "world size 2"]),  # 2 < 3, 3 % 2
        (tiny_args(dim=96, n_heads=12, n_kv_heads=3), 4, ["n_kv_heads=3", "world size 4"]),  # 4 > 3, 4 % 3
        (tiny_args(vocab_size=130), 4, ["vocab_size=130", "world size 4"]),
        (tiny_args(vocab_size=-1), 1, ["vocab_size", "-1"]),
        (tiny_args(n_kv_heads=3), 1, ["n_heads=4", "n_kv_heads=3"]),
        (tiny_args(dim=62), 1, ["dim=62", "n_heads=4"]),
        (tiny_args(n_layers=0), 1, ["n_layers", "0"]),
    ],
    ids=["heads-vs-world", "kv3-world2", "kv3-world4", "vocab", "vocab-unset", "heads-vs-kv", "dim-vs-heads",
         "no-layers"],
)
def test_validate_rejects_shapes_the_world_size_cannot_split(args, world_size, names):
    with raises_naming(ConfigError, *names):
        args.validate(world_size)


@pytest.mark.parametrize(
    "args, world_sizes",
    [
        (tiny_args(n_kv_heads=2), (1, 2, 4)),  # at 4 ranks each KV head is replicated on 2 ranks
        (tiny_args(dim=96, n_heads=12, n_kv_heads=3, vocab_size=96, multiple_of=96), (1, 3, 6, 12)),
    ],
)
def test_validate_accepts_divisible_shapes(args, world_sizes):
    for n in world_sizes:
        args.validate(n)


def test_check_world_size():
    for shards, world in [(1, 1), (1, 4), (2, 4), (4, 2), (8, 1), (3, 3)]:
        check_world_size(shards, world, "ckpt")
    with raises_naming(CheckpointError, "/models/x", "2 shard(s)", "3 rank(s)"):
        check_world_size(2, 3, "/models/x")


def test_vocab_size_minus_one_is_read_from_the_embedding(tmp_path):
    for shards in (1, 2):
        ckpt = tmp_path / f"s{shards}"
        write_checkpoint(ckpt, tiny_args(), shards, family="llama2")
        assert json.loads((ckpt / "params.json").read_text())["vocab_size"] == -1
        assert read_model_args(ckpt).vocab_size == 128


# ---- ShardSet.read: any slice from any shard layout ------------------------------------------------------


@pytest.mark.parametrize("embedding_split_dim", [0, 1], ids=["llama3-vocab-split", "llama2-width-split"])
@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_round_trip_every_slice(tmp_path, num_shards, embedding_split_dim):
    args = tiny_args(n_kv_heads=2, n_layers=1)
    weights = random_meta_weights(args, seed=num_shards)
    save_meta_checkpoint(weights, params_of(args), tmp_path, num_shards, embedding_split_dim)
    shards = ShardSet(shard_paths(tmp_path))
    assert len(shards) == num_shards

    for name, full in weights.items():
        assert torch.equal(shards.read(name, tuple(full.shape), None), full), name
        dim = meta_split_dim(name)  # the model's split: embeddings by vocabulary whatever the shards do
        if dim is None:
            continue
        for world in (1, 2, 4, 8):
            per_rank = full.shape[dim] // world
            for rank in range(world):
                spec = ShardSpec(dim, rank * per_rank, (rank + 1) * per_rank, tuple(full.shape))
                got = shards.read(name, tuple(full.shape), spec)
                assert torch.equal(got, full.narrow(dim, spec.start, per_rank)), (name, world, rank)
        # An unaligned slice crossing shard boundaries, along each dimension.
        for d in range(full.dim()):
            spec = ShardSpec(d, 3, full.shape[d] - 5, tuple(full.shape))
            assert torch.equal(shards.read(name, tuple(full.shape), spec), full.narrow(d, 3, full.shape[d] - 8))


@pytest.mark.parametrize("n_kv_heads, num_shards", [(2, 4), (2, 8), (4, 8), (1, 4)])
def test_replicated_kv_head_shards(tmp_path, n_kv_heads, num_shards):
    """More shards than KV heads: each shard holds one whole head, each head repeated on consecutive shards."""
    head_dim, dim = 16, 64
    full = torch.randn(n_kv_heads * head_dim, dim)
    heads = full.split(head_dim)
    copies = num_shards // n_kv_heads
    for i in range(num_shards):
        torch.save({"layers.0.attention.wk.weight": heads[i // copies].clone()}, tmp_path / f"consolidated.{i:02d}.pth")
    shards = ShardSet(shard_paths(tmp_path))
    shape = tuple(full.shape)

    assert torch.equal(shards.read("layers.0.attention.wk.weight", shape, None), full)
    for first in range(n_kv_heads):
        for count in range(1, n_kv_heads - first + 1):
            spec = ShardSpec(0, first * head_dim, (first + count) * head_dim, shape)
            got = shards.read("layers.0.attention.wk.weight", shape, spec)
            assert torch.equal(got, full[spec.start : spec.stop]), (first, count)
    half_heads = ShardSpec(0, head_dim // 2, full.shape[0] - head_dim // 4, shape)
    assert torch.equal(shards.read("layers.0.attention.wk.weight", shape, half_heads), full[half_heads.start : half_heads.stop])
    columns = ShardSpec(1, 10, 30, shape)
    assert torch.equal(shards.read("layers.0.attention.wk.weight", shape, columns), full[:, 10:30])


def test_missing_tensor_is_named(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    with raises_naming(CheckpointError, "consolidated.00.pth", "layers.9.attention.wq.weight"):
        ShardSet(shard_paths(tmp_path)).read("layers.9.attention.wq.weight", (64, 64), None)


def test_inconsistent_shard_shapes_are_named(tmp_path):
    torch.save({"output.weight": torch.zeros(64, 64)}, tmp_path / "consolidated.00.pth")
    torch.save({"output.weight": torch.zeros(32, 64)}, tmp_path / "consolidated.01.pth")
    with raises_naming(CheckpointError, "output.weight", "inconsistent"):
        ShardSet(shard_paths(tmp_path)).read("output.weight", (128, 64), None)


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_params_claiming_more_rows_than_the_shards_hold(tmp_path):
    write_checkpoint(tmp_path, tiny_args())  # vocab 128
    shards = ShardSet(shard_paths(tmp_path))
    with time_limit(1.0), raises_naming(CheckpointError, "tok_embeddings.weight"):
        shards.read("tok_embeddings.weight", (256, 64), None)  # params.json saying vocab_size=256


# ---- load_model on 2 ranks --------------------------------------------------------------------------------


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
