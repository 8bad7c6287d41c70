"""The paged KV cache's allocator: blocks, reference counts, prefix reuse by chained keys, eviction of the least
recently freed block, and keys that are never trusted alone (a forced collision is no hit)."""

from llama_dist.engine.block_manager import RESERVED_BLOCKS, BlockManager
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.sequence import Sequence

BS = 4


def _seq(tokens, request_id="r", **params) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(**params), frozenset(), max_tokens=4)


def _computed(blocks: BlockManager, seq: Sequence) -> None:
    """What a step that computes the rest of `seq`'s tokens leaves behind."""
    seq.num_computed_tokens = seq.num_tokens
    blocks.publish(seq)


def test_allocate_and_free_give_blocks_and_take_them_back():
    blocks = BlockManager(RESERVED_BLOCKS + 6, BS)
    seq = _seq(range(1, 10))  # 9 tokens: 3 blocks
    assert blocks.can_allocate(seq)
    blocks.allocate(seq)
    assert len(seq.block_table) == 3 and 0 not in seq.block_table and blocks.num_free_blocks == 3
    assert seq.num_computed_tokens == 0 and blocks.usage == 0.5
    assert blocks.can_append(seq, 12) and not blocks.can_append(seq, 25)
    blocks.append(seq, 13)  # a fourth block from position 12 on
    assert len(seq.block_table) == 4 and blocks.num_free_blocks == 2
    blocks.free(seq)
    assert seq.block_table == [] and blocks.num_free_blocks == 6
    assert not blocks.can_allocate(_seq(range(30)))


def test_a_prompt_reuses_the_cached_blocks_of_an_earlier_one_and_computes_the_rest():
    blocks = BlockManager(RESERVED_BLOCKS + 8, BS)
    first = _seq(range(1, 12), "first")  # 11 tokens: 2 full blocks + 3
    blocks.allocate(first)
    _computed(blocks, first)
    second = _seq(list(range(1, 9)) + [99, 98, 97, 96, 95], "second")  # shares the first 2 blocks (8 tokens)
    blocks.allocate(second)
    assert second.block_table[:2] == first.block_table[:2] and second.num_computed_tokens == 8
    assert second.num_cached_tokens == 8 and blocks.blocks[first.block_table[0]].ref_count == 2
    assert blocks.hits == 8 and blocks.queries == 11 + 13
    # A prompt that is all cached blocks still computes its last token: its last block is its own.
    same = _seq(range(1, 9), "same")
    blocks.allocate(same)
    assert same.num_computed_tokens == 4 and same.block_table[0] == first.block_table[0]
    assert same.block_table[1] != first.block_table[1]


def test_freed_blocks_stay_findable_until_their_memory_is_needed():
    blocks = BlockManager(RESERVED_BLOCKS + 3, BS)
    a = _seq(range(1, 10), "a")  # 3 blocks: the whole pool
    blocks.allocate(a)
    _computed(blocks, a)
    blocks.free(a)
    again = _seq(range(1, 10), "again")
    blocks.allocate(again)
    assert again.num_cached_tokens == 8  # found after a was freed
    blocks.free(again)
    other = _seq(range(50, 55), "other")  # 2 blocks: evicts the least recently freed (a's last blocks first)
    blocks.allocate(other)
    blocks.free(other)
    third = _seq(range(1, 10), "third")
    assert blocks.can_allocate(third)
    blocks.allocate(third)
    assert third.num_cached_tokens == 4  # the first block survived; the second was evicted


def test_prefix_caching_off_and_prompt_logprobs_never_reuse():
    for blocks, params in ((BlockManager(RESERVED_BLOCKS + 8, BS, prefix_caching=False), {}),
                           (BlockManager(RESERVED_BLOCKS + 8, BS), {"prompt_logprobs": True})):
        first = _seq(range(1, 12), "first")
        blocks.allocate(first)
        _computed(blocks, first)
        second = _seq(range(1, 12), "second", **params)
        blocks.allocate(second)
        assert second.num_cached_tokens == 0 and not set(second.block_table) & set(first.block_table)


def test_a_key_collision_is_not_a_hit():
    """Every block gets the same key: a lookup finds a block, but its tokens differ, so nothing is reused."""
    blocks = BlockManager(RESERVED_BLOCKS + 8, BS, key_fn=lambda parent, tokens: b"same")
    first = _seq(range(1, 12), "first")
    blocks.allocate(first)
    _computed(blocks, first)
    other = _seq(range(100, 111), "other")
    blocks.allocate(other)
    assert other.num_cached_tokens == 0 and other.num_computed_tokens == 0
    same = _seq(range(1, 12), "same")  # the same tokens do match the one block published under that key
    blocks.allocate(same)
    assert same.num_cached_tokens == 4


def test_shared_blocks_are_never_written_by_a_second_sequence():
    """A sequence writes only at positions from its num_computed_tokens on: never inside a block it shares."""
    blocks = BlockManager(RESERVED_BLOCKS + 8, BS)
    first = _seq(range(1, 12), "first")
    blocks.allocate(first)
    _computed(blocks, first)
    second = _seq(range(1, 14), "second")
    blocks.allocate(second)
    shared = [b for b in second.block_table if blocks.blocks[b].ref_count > 1]
    written = {second.block_table[p // BS] for p in range(second.num_computed_tokens, second.num_tokens)}
    assert shared and not written & set(shared)


def _run_of(table: list[int]) -> bool:
    return table == list(range(table[0], table[0] + len(table)))


def test_with_seek_runs_each_sequence_grows_in_a_run_of_consecutive_blocks():
    blocks = BlockManager(RESERVED_BLOCKS + 12, BS, seek_runs=True)
    a, b = _seq(range(1, 6), "a"), _seq(range(1, 6), "b")  # 5 tokens + max_tokens 4: 3 blocks planned each
    blocks.allocate(a)
    blocks.allocate(b)
    assert len(a.block_table) == len(b.block_table) == 2
    for n in range(6, 10):  # both decode in turns: each grows into the block reserved after its own
        blocks.append(a, n)
        blocks.append(b, n)
    assert len(a.block_table) == len(b.block_table) == 3
    assert _run_of(a.block_table) and _run_of(b.block_table) and not set(a.block_table) & set(b.block_table)


def test_a_reservation_yields_when_nothing_else_is_free():
    blocks = BlockManager(RESERVED_BLOCKS + 5, BS, seek_runs=True)
    a = _seq(range(1, 6), "a")  # holds 2 blocks, reserves a third
    blocks.allocate(a)
    assert blocks.num_free_blocks == 3
    b = _seq(range(1, 13), "b")  # 3 blocks: only 2 are free and unreserved
    assert blocks.can_allocate(b)
    blocks.allocate(b)
    assert blocks.num_free_blocks == 0 and not set(a.block_table) & set(b.block_table)
    blocks.free(b)
    blocks.append(a, 9)  # its reservation is gone: it takes any free block
    assert len(a.block_table) == 3 and blocks.num_free_blocks == 2
    blocks.free(a)
    assert blocks.num_free_blocks == 5


def test_runs_prefer_blocks_that_hold_no_cached_prefix():
    blocks = BlockManager(RESERVED_BLOCKS + 8, BS, seek_runs=True)
    first = _seq(range(1, 9), "first")
    first.max_tokens = 0
    blocks.allocate(first)  # 2 blocks
    _computed(blocks, first)
    blocks.free(first)  # findable until evicted
    other = _seq(range(100, 108), "other")
    blocks.allocate(other)
    assert not set(other.block_table) & set(first.block_table)
    again = _seq(range(1, 9), "again")
    blocks.allocate(again)
    assert again.num_cached_tokens == 4  # the cached prefix survived (its last token is computed)
