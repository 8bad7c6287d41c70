"""The draft model of speculative decoding: a smaller model with the target's tokenizer (or an int4 copy of the
target itself) guessing the k tokens that a step then verifies (`engine.speculative`).

It runs on the same ranks as the target, sharded the same way, in the same process group: for each of its k
sub-steps rank 0 plans the rows (PlanKind.DRAFT; its guesses travel in those plans), every rank computes them,
rank 0 samples the next guess. Its KV cache is a pool of its own laid out like the target's: a sequence's block
table indexes both, so the target's block manager (prefix cache, blocks taken ahead for guesses, blocks given back
after rejections) governs the draft's cache too. The draft computes a prompt's chunks in the steps that compute
them for the model (within the step's budget), and otherwise catches up lazily: its first sub-step for a sequence
computes every token it has not computed yet (after a step, the model's token that followed the kept guesses; a
prompt whose start came from the prefix cache, whole).
"""

from __future__ import annotations

import torch

from llama_dist.engine.engine_config import pooled_cache
from llama_dist.engine.model_runner import ModelRunner
from llama_dist.engine.sampler import Sampler
from llama_dist.engine.scheduler import ScheduledChunk
from llama_dist.engine.speculative import sample_rows
from llama_dist.engine.step_plan import PlanKind, PlanRow, StepPlan, exchange
from llama_dist.model.llama import Transformer


class DraftModel:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.runner = ModelRunner(model, pooled_cache(model, num_blocks, block_size), compile=False)

    def propose(self, chunks: list[ScheduledChunk], sampler: Sampler) -> None:
        """Rank 0: replace the placeholder guesses of the speculative chunks with the draft's (and, for sampled
        sequences, the distributions they were drawn from); the draft computes the step's prompt chunks too, where
        it is up to their start, so it follows a prompt in the step's own chunks. Collective: the other ranks run
        `follow`."""
        speculative = [chunk for chunk in chunks if chunk.draft]
        # The step's other chunks (prompt chunks, decodes without guesses) that the draft is up to: it computes them too.
        in_step = [chunk for chunk in chunks if not chunk.draft and chunk.seq.num_draft_computed == chunk.start]
        guesses: dict[int, list[int]] = {id(chunk): [] for chunk in speculative}
        dists: dict[int, list[torch.Tensor]] = {id(chunk): [] for chunk in speculative}
        substeps = max((len(chunk.draft) for chunk in speculative), default=1 if in_step else 0)
        for j in range(substeps):
            # (chunk, start, tokens, whether a guess is sampled from its last position)
            rows = [(chunk, *self._row(chunk, j, guesses[id(chunk)]), True)
                    for chunk in speculative if len(chunk.draft) > j]
            if j == 0:
                rows += [(chunk, chunk.start, chunk.seq.token_ids(chunk.start, chunk.start + chunk.num_tokens), False)
                         for chunk in in_step]
            rows.sort(key=lambda row: len(row[2]) > 1)  # a plan's one-token rows come first
            plan = StepPlan(PlanKind.DRAFT)
            for chunk, start, tokens, guessing in rows:
                plan.rows.append(PlanRow(chunk.seq.block_table, start, len(tokens)))
                plan.token_ids += tokens
                if guessing:
                    plan.logits_indices.append(len(plan.token_ids) - 1)
            logits = self.runner.execute(exchange(plan))
            guessing = [chunk for chunk, _, _, wants in rows if wants]
            if not guessing:
                continue
            logits = logits.float()
            tokens = logits.argmax(dim=-1).tolist()  # one host read for every greedy row
            sampled = [i for i, chunk in enumerate(guessing) if not chunk.seq.params.greedy]
            if sampled:  # and one for every sampled row, each from its sequence's random stream
                q = sampler.probabilities(logits[sampled], [guessing[i].seq.params for i in sampled])
                uniforms = torch.cat([torch.rand(1, generator=guessing[i].seq.generator or sampler.generator,
                                                 device=q.device) for i in sampled])
                for i, token, dist in zip(sampled, sample_rows(q, uniforms), q):
                    tokens[i] = token
                    dists[id(guessing[i])].append(dist)
            for chunk, token in zip(guessing, tokens):
                guesses[id(chunk)].append(token)
        for chunk in in_step:
            chunk.seq.num_draft_computed += chunk.num_tokens
        for chunk in speculative:
            seq = chunk.seq
            chunk.draft = tuple(guesses[id(chunk)])
            chunk.draft_probs = torch.stack(dists[id(chunk)]) if dists[id(chunk)] else None
            # Computed: every token up to the newest, and the guesses but the last (it was only sampled).
            seq.num_draft_computed = seq.num_tokens + len(chunk.draft) - 1

    @staticmethod
    def _row(chunk: ScheduledChunk, j: int, guessed: list[int]) -> tuple[int, list[int]]:
        """Sub-step j's row of `chunk`'s sequence: (start position, tokens)."""
        seq = chunk.seq
        if j == 0:  # whatever the draft has not computed, up to the newest token
            start = min(seq.num_draft_computed, seq.num_tokens - 1)
            return start, seq.token_ids(start, seq.num_tokens)
        return seq.num_tokens - 1 + j, [guessed[-1]]

    def follow(self, plan: StepPlan) -> StepPlan:
        """Every rank but 0: compute the draft's sub-steps as they come; the step's own plan, which follows them."""
        while plan.kind == PlanKind.DRAFT:
            self.runner.execute(plan)
            plan = exchange(None)
        return plan
