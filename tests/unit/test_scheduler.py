"""The engine's scheduler without a model: the step budget, chunked prefill beside decodes, FIFO admission,
sequence and cache-block limits, abort in every state, preemption when the blocks run out."""

import pytest

from llama_dist.engine.block_manager import BlockManager
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.scheduler import Scheduler
from llama_dist.engine.sequence import Sequence, SequenceStatus


def _seq(request_id, prompt_len: int) -> Sequence:
    return Sequence(request_id, list(range(1, prompt_len + 1)), SamplingParams(), frozenset(), max_tokens=8)


def _run(scheduler: Scheduler, chunks, sampled_token: int = 7) -> None:
    """What the engine does after a step: the chunks are cached; a sequence complete now gains a token."""
    for chunk in chunks:
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if chunk.completes_sequence:
            chunk.seq.output_token_ids.append(sampled_token)


def _shape(chunks):
    return [(c.seq.request_id, c.start, c.num_tokens) for c in chunks]


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_running_decodes():
    scheduler = Scheduler(max_num_seqs=4, max_num_batched_tokens=8, block_manager=BlockManager(64, 4))
    a, b = _seq("a", 3), _seq("b", 20)
    scheduler.add(a)
    _run(scheduler, scheduler.schedule())  # a's prompt, whole
    scheduler.add(b)
    steps = []
    for _ in range(4):
        chunks = scheduler.schedule()
        steps.append(_shape(chunks))
        assert sum(c.num_tokens for c in chunks) <= 8
        _run(scheduler, chunks)
    # Every step: a's decode first (one token), then as much of b's prompt as the budget leaves.
    assert steps[0] == [("a", 3, 1), ("b", 0, 7)]
    assert steps[1] == [("a", 4, 1), ("b", 7, 7)]
    assert steps[2] == [("a", 5, 1), ("b", 14, 6)]  # b's last chunk: its first token is sampled from it
    assert steps[3] == [("a", 6, 1), ("b", 20, 1)]  # both decode


def test_the_budget_is_never_exceeded_and_prompts_are_admitted_in_arrival_order():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=5, block_manager=BlockManager(64, 4))
    for i, length in enumerate([4, 4, 4]):
        scheduler.add(_seq(i, length))
    first = scheduler.schedule()
    assert _shape(first) == [(0, 0, 4), (1, 0, 1)]  # FIFO: the second prompt starts with what is left
    _run(scheduler, first)
    second = scheduler.schedule()
    assert _shape(second) == [(0, 4, 1), (1, 1, 3), (2, 0, 1)]
    assert [s.request_id for s in scheduler.running] == [0, 1, 2]


def test_running_sequences_and_cache_rows_are_bounded():
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=100, block_manager=BlockManager(64, 4))
    for i in range(4):
        scheduler.add(_seq(i, 2))
    chunks = scheduler.schedule()
    assert [c.seq.request_id for c in chunks] == [0, 1] and len(scheduler.waiting) == 2
    blocks = BlockManager(2, 4)  # one usable block (block 0 is the scratch block)
    limited = Scheduler(max_num_seqs=4, max_num_batched_tokens=100, block_manager=blocks)
    limited.add(_seq("x", 2))
    limited.add(_seq("y", 2))
    assert [c.seq.request_id for c in limited.schedule()] == ["x"]  # one block only
    assert blocks.usage == 1.0


@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding"])
def test_abort_in_every_state_frees_the_row(state):
    blocks = BlockManager(9, 4)
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=4, block_manager=blocks)
    seq = _seq("s", 10 if state == "prefilling" else 2)
    if state == "waiting":
        scheduler.add(_seq("first", 4))
        scheduler.add(_seq("second", 4))
        scheduler.schedule()  # the budget goes to the first two: s waits
    scheduler.add(seq)
    chunks = scheduler.schedule()
    _run(scheduler, chunks)
    if state == "decoding":
        assert not seq.prefilling and seq.status == SequenceStatus.RUNNING
    elif state == "prefilling":
        assert seq.prefilling and seq.status == SequenceStatus.RUNNING
    else:
        assert seq.status == SequenceStatus.WAITING
    free, held = blocks.num_free_blocks, len(seq.block_table)
    assert held == (0 if state == "waiting" else blocks.blocks_for(seq.num_tokens))
    scheduler.finish(scheduler.find("s"), "abort")
    assert seq.status == SequenceStatus.FINISHED and seq.finish_reason == "abort" and seq.block_table == []
    assert scheduler.find("s") is None and seq not in scheduler.running and seq not in scheduler.waiting
    assert blocks.num_free_blocks == free + held
    assert all(c.seq is not seq for c in scheduler.schedule())


def test_decodes_come_first_even_when_they_fill_the_budget():
    scheduler = Scheduler(max_num_seqs=4, max_num_batched_tokens=2, block_manager=BlockManager(64, 4))
    for i in range(2):
        scheduler.add(_seq(i, 1))
    _run(scheduler, scheduler.schedule())
    scheduler.add(_seq("late", 3))
    assert _shape(scheduler.schedule()) == [(0, 1, 1), (1, 1, 1)]  # the new prompt waits for room


def test_the_newest_sequence_is_preempted_when_blocks_run_out_and_recomputed_later():
    blocks = BlockManager(1 + 4, 2)  # 4 usable blocks of 2 tokens
    scheduler = Scheduler(max_num_seqs=4, max_num_batched_tokens=100, block_manager=blocks)
    old, new = _seq("old", 3), _seq("new", 3)  # 2 blocks each: the pool is full
    scheduler.add(old)
    scheduler.add(new)
    _run(scheduler, scheduler.schedule())
    assert blocks.num_free_blocks == 0 and old.num_tokens == new.num_tokens == 4
    _run(scheduler, scheduler.schedule())  # position 3 fits the second blocks
    # old's next token (position 4) needs a third block: the newest running sequence gives its blocks back.
    chunks = scheduler.schedule()
    assert _shape(chunks) == [("old", 4, 1)]
    assert new.status == SequenceStatus.WAITING and scheduler.waiting[0] is new and new.block_table == []
    assert new.num_computed_tokens == 0 and new.num_preemptions == 1 and scheduler.num_preemptions == 1
    assert new.output_token_ids == [7, 7]  # kept: it is recomputed from prompt + output
    scheduler.finish(old, "stop")
    chunks = scheduler.schedule()
    assert _shape(chunks) == [("new", 0, 5)]  # its 3 prompt tokens and 2 outputs, in one chunk
