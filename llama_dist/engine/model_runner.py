"""Every rank's half of a step: the plan in, the model run over the engine's KV cache, the logits rank 0 asked
for out.

It owns how a step runs (`decode_step.step_mode`, from the device, the collectives' backend and the world size):
a step of decodes only may run through the compiled decode step (`decode_step.DecodeStep`: its rows padded to a
few batch-size buckets, their block tables to a few context-length buckets, CUDA graphs only where the collectives
are NCCL's); a step with prefill chunks always runs eagerly, as one flat batch. A step's inputs reach the device
without a host sync (`transfer.to_device`).
"""

from __future__ import annotations

import torch

from llama_dist.dist.groups import cuda_collectives_backend, model_parallel_world_size
from llama_dist.engine.decode_step import DecodeStep, StepMode, step_mode
from llama_dist.engine.step_plan import StepPlan
from llama_dist.engine.transfer import to_device
from llama_dist.model.attention import DecodeRows, KVCache, RowGroup, Runs, StepLayout, Strided, as_strided_rows
from llama_dist.model.llama import Transformer


# Runs of at least this many blocks on average are read as slices (a copy call each) rather than one gather.
MIN_BLOCKS_PER_RUN = 4


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, compile: bool | None = None):
        self.model, self.cache = model, cache
        self.device = model.tok_embeddings.weight.device
        mode = step_mode(self.device.type, cuda_collectives_backend(), model_parallel_world_size(), compile)
        # The compiled step decodes the model's cache: it runs only when that is the engine's cache.
        self.decode_step = DecodeStep(model, mode if cache is model.cache else StepMode.EAGER)
        self.compiled = self.decode_step.compiled
        self.last_step_prefilled = False  # whether the last step computed prompt chunks (timing reports read it)
        self.last_decode_read = ""  # how the last step's decode rows read their context: view, runs or gather

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run the plan's rows; float32 logits (len(plan.logits_indices), vocab) on rank 0, None elsewhere."""
        n_decode = plan.num_decode_rows
        self.last_step_prefilled = n_decode < len(plan.rows) or any(row.start == 0 for row in plan.rows)
        if self.compiled and n_decode == len(plan.rows):
            return self._compiled_decode(plan)
        tokens = to_device(torch.tensor(plan.token_ids, dtype=torch.long), self.device)
        layout = self.layout(plan)
        logits_indices = to_device(torch.tensor(plan.logits_indices, dtype=torch.long), self.device)
        return self.model.forward_step(tokens, layout, self.cache, logits_indices)

    def layout(self, plan: StepPlan) -> StepLayout:
        """The plan's rows as the model's StepLayout: positions, slot mapping, the decode rows and the groups, each
        reading its rows' blocks as a view where they lie evenly in memory."""
        block_size, device = self.cache.block_size, self.device
        positions, slots = [], []
        for row in plan.rows:
            for position in range(row.start, row.start + row.num_tokens):
                positions.append(position)
                slots.append(row.block_table[position // block_size] * block_size + position % block_size)
        n_decode = plan.num_decode_rows
        decode = None
        if n_decode:
            rows = plan.rows[:n_decode]
            kv_len = max(r.start for r in rows) + 1
            decode = DecodeRows(self._tables([r.block_table for r in rows], kv_len),
                                to_device(torch.tensor([r.start for r in rows]), device), kv_len)
            self.last_decode_read = {Strided: "view", Runs: "runs"}.get(type(decode.tables), "gather")
        groups: list[RowGroup] = []
        tables: list[list[list[int]]] = []
        token = n_decode
        for row in plan.rows[n_decode:]:
            context = row.start + row.num_tokens
            last = groups[-1] if groups else None
            if last is not None and (last.query_len, last.context_len) == (row.num_tokens, context):
                tables[-1].append(row.block_table)  # the same shape: one batched attention call
                last.n_rows += 1
            else:
                groups.append(RowGroup(token, 1, row.num_tokens, context, None))
                tables.append([row.block_table])
            token += row.num_tokens
        for group, group_tables in zip(groups, tables):
            group.tables = self._tables(group_tables, group.context_len)
        return StepLayout(to_device(torch.tensor(positions), device), to_device(torch.tensor(slots), device), decode,
                          groups)

    def _tables(self, tables: list[list[int]], length: int) -> torch.Tensor | Strided | Runs:
        """The rows' block tables covering [0, length): a view when every row's blocks lie one after the other,
        evenly spaced (Meta's rows, fresh allocations); on CPUs, runs of consecutive blocks when they are long
        (each a slice copy, where a gather costs one more copy of the whole context); else a (rows, blocks)
        tensor to gather through."""
        block_size, blocks = self.cache.block_size, self.cache.row_blocks(length)
        tables = [t[:blocks] for t in tables]
        padded = [t + [0] * (blocks - len(t)) for t in tables]  # a shorter row reads block 0 past its end (masked)
        view = as_strided_rows(padded, block_size)
        if view is not None and (view.rows - 1) * view.row_stride + blocks * block_size <= self.cache.num_tokens:
            return view
        if self.device.type == "cpu":
            runs = Runs.of(tables, block_size)
            if runs.num_runs * MIN_BLOCKS_PER_RUN <= blocks * len(tables):
                return runs
        return to_device(torch.tensor(padded), self.device)

    @torch.inference_mode()
    def warm_up(self) -> list[tuple[int, int]]:
        """Compile every (batch bucket, context bucket) shape of the compiled step now (a server does it before it
        listens, so no client waits for a compile); the (rows, context blocks) shapes warmed, none when eager.
        Collective: every rank calls it. Each row is a padding row: it writes only the scratch block 0. With CUDA
        graphs each shape runs twice: the second call records its graph."""
        if not self.compiled:
            return []
        calls = 2 if self.decode_step.mode == StepMode.CUDA_GRAPHS else 1
        for rows, blocks in self.decode_step.shapes:
            tokens, positions, tables = self._padded_inputs([], [], blocks, rows)
            for _ in range(calls):
                self.decode_step(tokens, positions, tables=tables)
        return self.decode_step.shapes

    def _padded_inputs(self, plan_rows, token_ids: list[int], blocks: int, size: int):
        """(tokens, positions, tables) on the device of `plan_rows` padded to `size` rows of `blocks` blocks, in one
        transfer. A padding row decodes a dummy token in the scratch block 0 (its table all zeros) at the last
        position the bucket covers: written, never read."""
        n, block_size = len(plan_rows), self.cache.block_size
        pad_position = min(blocks * block_size, self.decode_step.max_seq_len) - 1
        tables = []
        for row in plan_rows:
            table = row.block_table[:blocks]
            tables += table + [0] * (blocks - len(table))
        values = (token_ids + [0] * (size - n) + [row.start for row in plan_rows] + [pad_position] * (size - n)
                  + tables + [0] * ((size - n) * blocks))
        inputs = to_device(torch.tensor(values, dtype=torch.long), self.device)
        return inputs[:size], inputs[size : 2 * size], inputs[2 * size :].view(size, blocks)

    def _compiled_decode(self, plan: StepPlan) -> torch.Tensor | None:
        """The plan's rows padded to the compiled step's next batch bucket, their block tables to the context bucket
        that holds the longest row."""
        n = len(plan.rows)
        blocks = self.decode_step.context_bucket_for(self.cache.row_blocks(max(r.start for r in plan.rows) + 1))
        tokens, positions, tables = self._padded_inputs(plan.rows, plan.token_ids, blocks,
                                                        self.decode_step.bucket_for(n))
        logits = self.decode_step(tokens, positions, tables=tables)
        if logits is None:
            return None
        if plan.logits_indices == list(range(n)):  # every row samples (the usual step): a view, nothing to send
            return logits[:n]
        return logits[to_device(torch.tensor(plan.logits_indices, dtype=torch.long), self.device)]
