"""Every rank's half of a step: the plan in, the model run over the engine's KV cache, the logits rank 0 asked
for out.

It owns the eager/compiled choice: a step of decodes only may run through the compiled decode step
(`decode_step.DecodeStep`: every cache row over the whole cache, CUDA graphs only where the collectives are
NCCL's); a step with prefill chunks always runs eagerly, as one flat batch.
"""

from __future__ import annotations

import torch

from llama_dist.engine.decode_step import DecodeStep
from llama_dist.engine.step_plan import StepPlan
from llama_dist.model.attention import DecodeRows, KVCache, RowGroup, StepLayout
from llama_dist.model.llama import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, compile: bool | None = None):
        self.model, self.cache = model, cache
        self.device = model.tok_embeddings.weight.device
        # The compiled step decodes the model's default cache: it runs only when that is the engine's cache.
        self.decode_step = DecodeStep(model, compile)
        self.compiled = self.decode_step.compiled and cache is model.cache
        self.last_step_prefilled = False  # whether the last step computed prompt chunks (timing reports read it)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run the plan's rows; float32 logits (len(plan.logits_indices), vocab) on rank 0, None elsewhere."""
        n_decode = plan.num_decode_rows
        self.last_step_prefilled = n_decode < len(plan.rows) or any(row.start == 0 for row in plan.rows)
        if self.compiled and n_decode == len(plan.rows):
            return self._compiled_decode(plan)
        tokens = torch.tensor(plan.token_ids, dtype=torch.long)
        layout = self.layout(plan)
        logits_indices = torch.tensor(plan.logits_indices, dtype=torch.long, device=self.device)
        return self.model.forward_step(tokens.to(self.device), layout, self.cache, logits_indices)

    def layout(self, plan: StepPlan) -> StepLayout:
        """The plan's rows as the model's StepLayout: positions, slot mapping, the decode rows and the groups."""
        max_seq_len, device = self.cache.max_seq_len, self.device
        positions, slots = [], []
        for row in plan.rows:
            row_positions = range(row.start, row.start + row.num_tokens)
            positions += row_positions
            slots += [row.cache_row * max_seq_len + p for p in row_positions]
        n_decode = plan.num_decode_rows
        decode = None
        if n_decode:
            rows = plan.rows[:n_decode]
            decode = DecodeRows(torch.tensor([r.cache_row for r in rows], device=device),
                                torch.tensor([r.start for r in rows], device=device),
                                max(r.start for r in rows) + 1)
        groups: list[RowGroup] = []
        token = n_decode
        for row in plan.rows[n_decode:]:
            context = row.start + row.num_tokens
            last = groups[-1] if groups else None
            if last is not None and (last.query_len, last.context_len) == (row.num_tokens, context):
                last.cache_rows.append(row.cache_row)  # the same shape: one batched attention call
                last.n_rows += 1
            else:
                groups.append(RowGroup(token, 1, row.num_tokens, context, [row.cache_row]))
            token += row.num_tokens
        for group in groups:
            group.cache_rows = torch.tensor(group.cache_rows, device=device)
        return StepLayout(torch.tensor(positions, device=device), torch.tensor(slots, device=device), decode, groups)

    def _compiled_decode(self, plan: StepPlan) -> torch.Tensor | None:
        rows = torch.tensor([r.cache_row for r in plan.rows], device=self.device)
        tokens = torch.tensor(plan.token_ids, dtype=torch.long, device=self.device)
        positions = torch.tensor([r.start for r in plan.rows], device=self.device)
        logits = self.decode_step(tokens, positions, slots=rows)  # (rows, vocab) on every rank
        if logits is None:
            return None
        return logits[torch.tensor(plan.logits_indices, device=self.device)]
