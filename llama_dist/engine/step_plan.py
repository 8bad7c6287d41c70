"""The step plan: what every rank computes in one step, decided on rank 0 and sent as two tensor broadcasts (a
fixed-size header, then one int64 payload), no pickling.

A step is a list of rows, decode rows first: each row is `num_tokens` tokens of one sequence from position
`start` on, its keys and values in the cache blocks of its `block_table`. The payload carries the rows, their block
tables, every token id the step computes (the tokens sampled last step are the decode rows' inputs: that is how
they reach the other ranks), and which tokens' logits rank 0 needs. Every rank builds the same model inputs from it, so the ranks cannot fall out of step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from llama_dist.model.parallel import broadcast_from_rank0


class PlanKind(enum.IntEnum):
    STEP = 0  # compute the rows
    IDLE = 1  # nothing to compute: a heartbeat, so the other ranks' waits stay within the group timeout
    DONE = 2  # the work the loop was started for is finished (offline generation returns)
    SHUTDOWN = 3  # the server stops
    ABORT = 4  # rank 0 failed deciding or sampling: every rank raises
    DRAFT = 5  # compute the rows with the draft model (speculative decoding); the step's own plan follows


HEADER_SIZE = 5  # kind, rows, tokens, logits, block table entries


@dataclass
class PlanRow:
    block_table: list[int]  # covering at least positions [0, start + num_tokens)
    start: int
    num_tokens: int


@dataclass
class StepPlan:
    kind: PlanKind = PlanKind.STEP
    rows: list[PlanRow] = field(default_factory=list)  # decode rows (one token each) first
    token_ids: list[int] = field(default_factory=list)  # every row's tokens, in row order
    logits_indices: list[int] = field(default_factory=list)  # flat token indices whose logits rank 0 samples or scores

    @property
    def num_decode_rows(self) -> int:
        """The leading rows of one token (decodes: each attends over its cached positions up to its own)."""
        n = 0
        while n < len(self.rows) and self.rows[n].num_tokens == 1:
            n += 1
        return n

    def _payload(self) -> torch.Tensor:
        rows = [v for row in self.rows for v in (row.start, row.num_tokens, len(row.block_table))]
        tables = [b for row in self.rows for b in row.block_table]
        return torch.tensor(rows + tables + self.token_ids + self.logits_indices, dtype=torch.long)

    def _header(self) -> list[int]:
        return [int(self.kind), len(self.rows), len(self.token_ids), len(self.logits_indices),
                sum(len(row.block_table) for row in self.rows)]


def exchange(plan: StepPlan | None) -> StepPlan:
    """Rank 0's `plan` on every rank (the others pass None). Collective over the model-parallel group; the tensors
    stay on the CPU (gloo carries them in every configuration: cpu:gloo,cuda:nccl on GPUs)."""
    header = torch.zeros(HEADER_SIZE, dtype=torch.long)
    if plan is not None:
        header.copy_(torch.tensor(plan._header()))
    broadcast_from_rank0(header)
    kind, n_rows, n_tokens, n_logits, n_blocks = header.tolist()
    if n_rows == 0:
        return plan if plan is not None else StepPlan(PlanKind(kind))
    size = 3 * n_rows + n_blocks + n_tokens + n_logits
    payload = plan._payload() if plan is not None else torch.empty(size, dtype=torch.long)
    broadcast_from_rank0(payload)
    if plan is not None:
        return plan
    values = payload.tolist()
    rows, offset = [], 3 * n_rows
    for i in range(n_rows):
        start, num_tokens, blocks = values[3 * i : 3 * i + 3]
        rows.append(PlanRow(values[offset : offset + blocks], start, num_tokens))
        offset += blocks
    return StepPlan(PlanKind(kind), rows, values[offset : offset + n_tokens], values[offset + n_tokens :])
