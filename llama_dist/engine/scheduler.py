"""Rank 0's scheduler: which tokens each step computes, under one token budget.

Each step: every running sequence whose prompt is cached decodes one token first (so a long prompt arriving never
stalls the streams already running), then prompts are prefilled in chunks filling what is left of the budget:
first those already started, then waiting ones in arrival order (FIFO), as long as a sequence slot and cache blocks
are free. A prompt longer than the budget is prefilled over several steps, alongside the decodes.

With speculative decoding (`propose`), a decoding sequence's chunk also carries the tokens guessed to follow its
newest one: they count against the budget, and blocks for them are taken ahead (given back by the engine for
the guesses it rejects).

When a decoding sequence needs a new block and none is free, the newest running sequence is preempted: it gives
its blocks back and waits at the front of the queue, to be recomputed from its tokens (prompt and output so far;
its random generator keeps its state, so its output is the same as without the preemption).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llama_dist.engine.block_manager import BlockManager
from llama_dist.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq` from position `start` on are computed this step."""

    seq: Sequence
    start: int
    num_tokens: int
    draft: tuple[int, ...] = ()  # guessed tokens after the sequence's newest (speculative decoding), included above
    draft_probs: torch.Tensor | None = None  # (len(draft), vocab): the distributions a draft model drew them from

    @property
    def completes_sequence(self) -> bool:
        """After this step every token of the sequence is cached: its next token is sampled from the last one."""
        return self.start + self.num_tokens - len(self.draft) == self.seq.num_tokens


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager,
                 propose: Callable[[Sequence, int], list[int]] | None = None):
        """propose(seq, k): up to k tokens guessed to follow seq's tokens (speculative decoding), or None."""
        self.propose = propose
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def schedule(self) -> list[ScheduledChunk]:
        """This step's chunks: decodes first, then prefill chunks, within max_num_batched_tokens."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        speculative: list[ScheduledChunk] = []  # after the one-token decodes: the plan wants those first
        for seq in list(self.running):
            if seq.prefilling or seq not in self.running or budget <= 0:
                continue
            while not self.block_manager.can_append(seq, seq.num_tokens) and seq in self.running:
                self.preempt(self.running[-1])  # the newest gives its blocks back (possibly seq itself)
            if seq in self.running:
                draft = self._draft(seq, budget - 1)
                self.block_manager.append(seq, seq.num_tokens + len(draft))
                chunk = ScheduledChunk(seq, seq.num_computed_tokens, 1 + len(draft), tuple(draft))
                (speculative if draft else chunks).append(chunk)
                budget -= chunk.num_tokens
        chunks += speculative
        for seq in self.running:
            if seq.prefilling and budget > 0:
                chunks.append(self._prefill_chunk(seq, budget))
                budget -= chunks[-1].num_tokens
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and not self.waiting[0].waits_for_its_prompt and self.block_manager.can_allocate(self.waiting[0])):
            seq = self.waiting.popleft()
            self.block_manager.allocate(seq)  # may find a cached prefix: num_computed_tokens skips it
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._prefill_chunk(seq, budget))
            budget -= chunks[-1].num_tokens
        return chunks

    def _draft(self, seq: Sequence, budget: int) -> list[int]:
        """The guesses `seq` is verified with this step: within the budget, the tokens it may still generate (the
        last one is always the model's own) and the free blocks (never preempting another sequence for them).
        None for a sequence with a grammar: its guesses would need the grammar's mask at every position."""
        room = min(budget, seq.max_tokens - len(seq.output_token_ids) - 1)
        if self.propose is None or room < 1 or seq.guide is not None:
            return []
        draft = self.propose(seq, room)[:room]
        while draft and not self.block_manager.can_append(seq, seq.num_tokens + len(draft)):
            draft.pop()
        return draft

    def preempt(self, seq: Sequence) -> None:
        """Take `seq`'s blocks back; it waits first in line and is recomputed from its tokens."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.num_computed_tokens, seq.num_draft_computed = SequenceStatus.WAITING, 0, 0
        seq.prompt_logprobs.clear()  # recomputed with the rest
        seq.prompt_top_logprobs.clear()
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    @staticmethod
    def _prefill_chunk(seq: Sequence, budget: int) -> ScheduledChunk:
        return ScheduledChunk(seq, seq.num_computed_tokens, min(seq.num_tokens - seq.num_computed_tokens, budget))

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End `seq` in any state: out of the queues, its cache row freed."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason, seq.error = SequenceStatus.FINISHED, reason, error
