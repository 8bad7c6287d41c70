"""Reading a row's context from the paged KV cache (a view, slices of runs and a gather give the same keys), and
attention over it against a float64 reference."""

import pytest
import torch

from llama_dist.model.attention import (
    KVCache,
    Runs,
    StepLayout,
    Strided,
    as_strided_rows,
    attend,
    read_context,
    write_cache,
)

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


# ---- attention itself: folded query-head groups (decode) and SDPA's causal mask (whole prompts) ----------------


def _reference(q, keys, values, query_positions):
    """float64 attention written out: q (rows, queries, heads, hd) at query_positions (rows, queries); keys, values
    (rows, L, kv heads, hd), each KV head repeated for its query heads (repeat_kv)."""
    n_rep = q.shape[2] // keys.shape[2]
    k, v = (t.double().repeat_interleave(n_rep, dim=2) for t in (keys, values))
    scores = torch.einsum("rqhd,rkhd->rhqk", q.double(), k) / q.shape[-1] ** 0.5
    visible = torch.arange(keys.shape[1])[None, None, None, :] <= query_positions[:, None, :, None]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("rhqk,rkhd->rqhd", weights, v)


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1])  # 1, 2, 4 and 8 query heads a KV head
@pytest.mark.parametrize("gather", [False, True])
def test_decode_rows_at_their_own_positions_equal_the_reference(kv_heads, gather):
    heads, hd, rows, kv_len = 8, 16, 3, 2 * BS + 3
    cache = KVCache.allocate(1, rows * 4, BS, kv_heads, hd, torch.float32, "cpu")
    cache.k[0].copy_(_random(*cache.k[0].shape, seed=1))
    cache.v[0].copy_(_random(*cache.v[0].shape, seed=2))
    tables = torch.arange(rows * 4).view(rows, 4)
    positions = torch.tensor([kv_len - 1, 0, 5])
    layout = StepLayout.decoding(positions, kv_len, cache, tables, None if gather else Strided(0, 4 * BS, rows))
    q = _random(rows, heads, hd, seed=3)
    out, _ = attend(q, None, None, layout, (cache.k[0], cache.v[0]))
    context = lambda c: c.view(rows, 4 * BS, kv_heads, hd)[:, :kv_len]  # noqa: E731
    want = _reference(q[:, None], context(cache.k[0]), context(cache.v[0]), positions[:, None])
    assert out.shape == (rows, heads * hd)
    torch.testing.assert_close(out.double(), want.reshape(rows, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("cached", [False, True])
def test_whole_prompts_equal_the_reference(kv_heads, cached):
    heads, hd, rows, length = 4, 16, 2, 11
    q, k, v = _random(rows * length, heads, hd, seed=4), _random(rows * length, kv_heads, hd, seed=5), _random(
        rows * length, kv_heads, hd, seed=6)
    cache = None
    if cached:  # the prompt's keys and values stored first, then read back through the rows' blocks
        blocks = KVCache.allocate(1, rows * 3, BS, kv_heads, hd, torch.float32, "cpu")
        layout = StepLayout.uniform(rows, length, 0, blocks, 3 * BS, "cpu")
        write_cache(blocks.k[0], blocks.v[0], k, v, layout.slot_mapping)
        cache = (blocks.k[0], blocks.v[0])
    else:
        layout = StepLayout.uniform(rows, length, 0, None, length, "cpu")
    out, _ = attend(q, k, v, layout, cache)
    split = lambda t: t.view(rows, length, *t.shape[1:])  # noqa: E731
    want = _reference(split(q), split(k), split(v), torch.arange(length).expand(rows, length))
    torch.testing.assert_close(out.double(), want.reshape(rows * length, -1), rtol=1e-5, atol=1e-5)


def test_sdpa_gets_no_mask_for_whole_prompts_and_no_gqa_flag_for_decodes(monkeypatch):
    """What keeps GPU flash kernels eligible: a whole prompt uses SDPA's causal flag (no boolean mask), decode rows
    fold their query heads (no enable_gqa next to their mask)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape, attn_mask is not None, kwargs.get("is_causal", False), kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    cache = KVCache.allocate(1, 4, BS, 2, 8, torch.float32, "cpu")
    prompt = StepLayout.uniform(1, 5, 0, cache, 4 * BS, "cpu")
    attend(_random(5, 4, 8), None, None, prompt, (cache.k[0], cache.v[0]))
    assert calls.pop() == ((1, 4, 5, 8), False, True, True)
    chunk = StepLayout.uniform(1, 3, 5, cache, 4 * BS, "cpu")  # a prompt's later chunk: positions cached before
    attend(_random(3, 4, 8), None, None, chunk, (cache.k[0], cache.v[0]))
    assert calls.pop()[1:3] == (True, False)
    decode = StepLayout.decoding(torch.tensor([7]), 8, cache, torch.tensor([[0, 1, 2, 3]]))
    attend(_random(1, 4, 8), None, None, decode, (cache.k[0], cache.v[0]))
    assert calls.pop() == ((1, 2, 2, 8), True, False, False)  # 2 KV heads, each with its 2 query heads as queries
