"""Reading a row's context from the paged KV cache: a view, slices of runs and a gather give the same keys."""

import torch

from llama_dist.model.attention import Runs, as_strided_rows, read_context

BS = 4


def _cache(blocks=12, dtype=torch.bfloat16):
    return torch.randn(blocks, BS, 2, 3, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_runs_and_a_gather_read_the_same_context():
    cache = _cache()
    tables = [[3, 4, 5, 9], [1, 2, 7, 8]]
    length = 15  # the last block only partly
    gathered = read_context(cache, torch.tensor(tables), length)
    runs = Runs.of(tables, BS)
    assert runs.rows[0] == [(12, 12), (36, 4)] and runs.num_runs == 4
    from_runs = read_context(cache, runs, length, torch.float32)
    assert from_runs.dtype == torch.float32 and from_runs.shape == gathered.shape
    assert torch.equal(from_runs, gathered.float())


def test_a_shorter_row_reads_zeros_past_its_end():
    cache = _cache()
    cache[0] = float("nan")  # block 0: padded rows write there; a read past a row's end must stay finite
    from_runs = read_context(cache, Runs.of([[1, 2, 3], [4]], BS), 12)
    assert torch.equal(from_runs[1, :4], cache[4]) and torch.all(from_runs[1, 4:] == 0)


def test_evenly_laid_rows_are_a_view():
    cache = _cache()
    view = as_strided_rows([[1, 2], [4, 5]], BS)
    assert view is not None and as_strided_rows([[1, 2], [4, 6]], BS) is None
    keys = read_context(cache, view, 8)
    assert keys.data_ptr() == cache[1].data_ptr()
    assert torch.equal(keys, read_context(cache, torch.tensor([[1, 2], [4, 5]]), 8))
