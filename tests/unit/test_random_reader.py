"""`random:NAME` checkpoints: a model preset's random weights drawn when read, the same for every reader."""

import pytest
import torch
from helpers import raises_naming

from llama_dist.checkpoint.formats import find_tokenizer, open_reader
from llama_dist.checkpoint.random_reader import RandomReader
from llama_dist.config import ModelArgs, transformer_configs
from llama_dist.errors import CheckpointError
from llama_dist.model.parallel import ShardSpec

WQ = "layers.0.attention.wq.weight"


def test_every_reader_of_a_name_draws_the_same_weights_and_a_slice_is_the_full_tensors():
    first, second = RandomReader("random:tiny"), open_reader("random:tiny")
    assert isinstance(second, RandomReader) and first.stored_args() == ModelArgs(**transformer_configs["tiny"])
    shape = first.shapes[WQ]
    full = first.read(WQ, shape, None)
    assert full.dtype == torch.bfloat16 and full.shape == shape and torch.equal(full, second.read(WQ, shape, None))
    assert torch.equal(first.read(WQ, shape, ShardSpec(0, 32, 64, shape)), full[32:64])
    assert torch.equal(first.read(WQ, shape, ShardSpec(1, 64, 128, shape)), full[:, 64:])
    assert not torch.equal(full, first.read("layers.1.attention.wq.weight", shape, None))  # each tensor its own
    norm = first.read("norm.weight", first.shapes["norm.weight"], None)
    assert 0.5 < norm.float().mean() < 1.5  # gains near 1, matrices scaled by their width
    assert full.float().std() == pytest.approx(shape[1] ** -0.5, rel=0.1)


def test_an_unknown_preset_or_tokenizer_is_named():
    with raises_naming(CheckpointError, "random:Llama-9", "Llama-3-8B"):
        open_reader("random:Llama-9")
    with raises_naming(FileNotFoundError, "random:tiny", "--tokenizer_path"):
        find_tokenizer("random:tiny")
