"""Meta's layout (formats/consolidated.py, formats/checklist.py): a clear error for every broken file, exact
slices from any shard layout, and checksum verification. Everything runs in this process: reading needs no
process group.
"""

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal

import pytest
import torch
from helpers import RunsShellCommand, params_of, raises_naming, shorten_storage_record, tiny_args, write_checkpoint

from llama_dist.checkpoint.checklist import file_md5, read_checklist, verify_checklist
from llama_dist.checkpoint.consolidated import (
    ConsolidatedReader,
    check_world_size,
    shard_paths,
    shard_split_dim,
    write_consolidated,
)
from llama_dist.errors import CheckpointError
from llama_dist.model.parallel import ShardSpec
from llama_dist.model.weights import random_weights

# ---- missing or malformed files ------------------------------------------------------------------------


def test_missing_checkpoint_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    with raises_naming(FileNotFoundError, missing):
        shard_paths(missing)
    with raises_naming(FileNotFoundError, missing):
        ConsolidatedReader(missing)


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
    write_checkpoint(tmp_path, tiny_args(), family="llama2")  # vocab -1: stored_args opens the shard too
    shard = tmp_path / "consolidated.00.pth"
    os.truncate(shard, shard.stat().st_size // 2)
    with raises_naming(CheckpointError, shard, "truncated or corrupt"):
        ConsolidatedReader(tmp_path).read("norm.weight", (64,), None)
    with raises_naming(CheckpointError, shard):
        ConsolidatedReader(tmp_path).stored_args()


def test_garbage_shard(tmp_path):
    write_checkpoint(tmp_path, tiny_args())
    shard = tmp_path / "consolidated.00.pth"
    shard.write_bytes(b"not a checkpoint\n" * 256)
    with raises_naming(CheckpointError, shard, "truncated or corrupt"):
        ConsolidatedReader(tmp_path).read("norm.weight", (64,), None)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"norm.weight": torch.ones(64), "exploit": RunsShellCommand(f"touch {shlex.quote(str(marker))}")}
    shard = tmp_path / "consolidated.00.pth"
    torch.save(payload, shard)
    (tmp_path / "params.json").write_text(json.dumps({**params_of(tiny_args()), "vocab_size": -1}))

    with raises_naming(CheckpointError, shard, "refused to unpickle"):
        ConsolidatedReader(tmp_path).read("norm.weight", (64,), None)
    with raises_naming(CheckpointError, shard):
        ConsolidatedReader(tmp_path).stored_args()
    assert not marker.exists()

    # The refusal never repeats torch's advice to load the file with weights_only=False.
    with pytest.raises(CheckpointError) as info:
        ConsolidatedReader(tmp_path).read("norm.weight", (64,), None)
    assert "weights_only" not in str(info.value) and "posix.system" in str(info.value), str(info.value)

    # The payload is live: an unrestricted torch.load would have run it (it only touches a file here).
    torch.load(shard, weights_only=False)
    assert marker.exists()


def test_storage_record_shorter_than_its_tensor_is_refused(tmp_path):
    """Without the check a memory-mapped load hands out the tensor with its neighbour's bytes in its second half."""
    torch.save({"first": torch.arange(256.0), "second": torch.full((256,), 7.0)}, tmp_path / "consolidated.00.pth")
    shorten_storage_record(tmp_path / "consolidated.00.pth", "0")
    with raises_naming(CheckpointError, "consolidated.00.pth", "'first'", "declares 1024 bytes", "512 bytes"):
        ConsolidatedReader(tmp_path).read("second", (256,), None)  # any tensor: the whole shard is refused


def test_tensor_reaching_beyond_its_storage_is_refused(tmp_path):
    # A tensor whose header claims more elements than its (intact) storage holds.
    torch.save({"w": torch.arange(64.0)}, tmp_path / "consolidated.00.pth")
    tensors = torch.load(tmp_path / "consolidated.00.pth", map_location="meta", weights_only=True)
    from llama_dist.checkpoint.torch_file import check_storage_records

    # Rebuilding such a tensor grows its storage past its record (as loading its header does): refused either way.
    wide = torch.empty(0, device="meta").set_(tensors["w"].untyped_storage(), 0, (128,), (1,))
    with raises_naming(CheckpointError, "'w'", "a record of 256 bytes"):
        check_storage_records(tmp_path / "consolidated.00.pth", {"w": wide})


@pytest.mark.parametrize("num_shards", [1, 2])
def test_a_shard_repeating_another_is_refused(tmp_path, num_shards):
    """`.NN` copied from the shard before it: one too many (S+1 shards), or in place of a real one (S shards)."""
    write_checkpoint(tmp_path, tiny_args(), num_shards=max(2, num_shards))
    last = tmp_path / f"consolidated.{max(2, num_shards) - 1:02d}.pth"
    if num_shards == 1:  # 2 good shards + a third repeating the second
        shutil.copy(last, tmp_path / "consolidated.02.pth")
        parts = ["3 shard(s)", "a shard too many"]
    else:  # the second shard overwritten by the first
        shutil.copy(tmp_path / "consolidated.00.pth", last)
        parts = ["consolidated.01.pth repeats consolidated.00.pth"]
    reader = ConsolidatedReader(tmp_path)
    for name, shape in [("output.weight", (128, 64)), ("layers.0.attention.wk.weight", (64, 64))]:
        with raises_naming(CheckpointError, name, *parts):
            reader.read(name, shape, ShardSpec(0, 0, 32, shape))  # even a slice from the first shard alone


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
        assert ConsolidatedReader(ckpt).stored_args().vocab_size == 128


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_vocab_size_from_the_embedding_of_either_split(tmp_path, family):
    """Llama 2 shards split the embedding by width (each holds every row), Llama 3 shards by vocabulary."""
    write_checkpoint(tmp_path, tiny_args(), 2, family=family)
    assert ConsolidatedReader(tmp_path).vocab_size_from_weights() == 128


def test_unused_tensor_in_a_later_shard_is_named(tmp_path):
    write_checkpoint(tmp_path, tiny_args(), 2)
    second = tmp_path / "consolidated.01.pth"
    tensors = torch.load(second, weights_only=True)
    torch.save({**tensors, "stray.weight": torch.zeros(4)}, second)
    with raises_naming(CheckpointError, "consolidated.01.pth", "stray.weight"):
        ConsolidatedReader(tmp_path).check_all_used(set(tensors))


# ---- ConsolidatedReader.read: any slice from any shard layout ------------------------------------------------------


@pytest.mark.parametrize("embedding_split_dim", [0, 1], ids=["llama3-vocab-split", "llama2-width-split"])
@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_round_trip_every_slice(tmp_path, num_shards, embedding_split_dim):
    args = tiny_args(n_kv_heads=2, n_layers=1)
    weights = random_weights(args, seed=num_shards)
    write_consolidated(weights, params_of(args), tmp_path, num_shards, embedding_split_dim)
    shards = ConsolidatedReader(tmp_path)
    assert len(shards) == num_shards

    for name, full in weights.items():
        assert torch.equal(shards.read(name, tuple(full.shape), None), full), name
        dim = shard_split_dim(name)  # the model's split: embeddings by vocabulary whatever the shards do
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
    shards = ConsolidatedReader(tmp_path)
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
        ConsolidatedReader(tmp_path).read("layers.9.attention.wq.weight", (64, 64), None)


def test_inconsistent_shard_shapes_are_named(tmp_path):
    torch.save({"output.weight": torch.zeros(64, 64)}, tmp_path / "consolidated.00.pth")
    torch.save({"output.weight": torch.zeros(32, 64)}, tmp_path / "consolidated.01.pth")
    with raises_naming(CheckpointError, "output.weight", "inconsistent"):
        ConsolidatedReader(tmp_path).read("output.weight", (128, 64), None)


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
    shards = ConsolidatedReader(tmp_path)
    with time_limit(1.0), raises_naming(CheckpointError, "tok_embeddings.weight"):
        shards.read("tok_embeddings.weight", (256, 64), None)  # params.json saying vocab_size=256




# ---- checklist.chk ----------------------------------------------------------------------------------------


def write_checklist(ckpt_dir, names=None) -> None:
    """Meta's checklist.chk for `names` (default: params.json and every shard), md5s computed independently."""
    names = names or ["params.json"] + [p.name for p in shard_paths(ckpt_dir)]
    lines = [f"{hashlib.md5((ckpt_dir / n).read_bytes()).hexdigest()}  {n}" for n in names]
    (ckpt_dir / "checklist.chk").write_text("\n".join(lines) + "\n")


@pytest.fixture
def checked_ckpt(tmp_path):
    """A one-shard checkpoint with a correct checklist.chk."""
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, tiny_args())
    write_checklist(ckpt)
    return ckpt


def test_file_md5_is_md5sums(checked_ckpt):
    shard = checked_ckpt / "consolidated.00.pth"
    assert file_md5(shard, chunk_bytes=1000) == hashlib.md5(shard.read_bytes()).hexdigest()


def test_verify_checklist_hashes_every_listed_file_once_across_parts(checked_ckpt):
    assert verify_checklist(checked_ckpt) == 2  # params.json and consolidated.00.pth
    assert sum(verify_checklist(checked_ckpt, part=p, parts=3) for p in range(3)) == 2


@pytest.mark.parametrize(
    "lines, parts",
    [
        (["d41d8cd98f00b204e9800998ecf8427e  params.json"], ["params.json has md5"]),
        (["not-an-md5  params.json"], ["line 1", "is not '<md5>  <file name>'"]),
        (["d41d8cd98f00b204e9800998ecf8427e  ../params.json"], ["line 1 names '../params.json'"]),
        (["d41d8cd98f00b204e9800998ecf8427e  absent.pth"], ["absent.pth is listed in", "but missing"]),
    ],
    ids=["wrong-md5", "malformed-line", "outside-the-dir", "listed-but-absent"],
)
def test_verify_checklist_names_the_bad_entry(checked_ckpt, lines, parts):
    good_lines = (checked_ckpt / "checklist.chk").read_text().splitlines()
    (checked_ckpt / "checklist.chk").write_text("\n".join(lines + good_lines[1:]) + "\n")  # replaces params.json's
    with raises_naming(CheckpointError, *parts):
        verify_checklist(checked_ckpt)


def test_verify_checklist_accepts_md5sum_binary_marker_and_upper_case(checked_ckpt):
    lines = [f"{md5.upper()} *{name}" for name, md5 in read_checklist(checked_ckpt).items()]
    (checked_ckpt / "checklist.chk").write_text("\n".join(lines) + "\n\n")
    assert verify_checklist(checked_ckpt) == 2


def test_verify_checklist_refuses_an_unlisted_shard(checked_ckpt):
    write_checklist(checked_ckpt, ["params.json"])
    with raises_naming(CheckpointError, "consolidated.00.pth is not listed in"):
        verify_checklist(checked_ckpt)


def test_verify_checklist_without_a_checklist(checked_ckpt):
    (checked_ckpt / "checklist.chk").unlink()
    with raises_naming(CheckpointError, "cannot verify checksums", checked_ckpt / "checklist.chk", "not found"):
        verify_checklist(checked_ckpt)


def test_every_format_maps_the_one_weight_inventory():
    """Hugging Face's names cover exactly the inventory's tensors; Meta's shards split each as the inventory says."""
    from llama_dist.checkpoint import hf
    from llama_dist.checkpoint.consolidated import shard_split_dim
    from llama_dist.config import ModelArgs, transformer_configs
    from llama_dist.model.weights import weight_inventory

    inventory = weight_inventory(ModelArgs(**transformer_configs["tiny"]))
    assert len({hf.hf_name(name) for name in inventory}) == len(inventory)
    for name, spec in inventory.items():
        expected = spec.split_dim if name != "tok_embeddings.weight" else 0  # Llama 3 shards: by vocabulary
        assert shard_split_dim(name) == expected, name
