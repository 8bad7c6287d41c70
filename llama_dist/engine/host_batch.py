"""What rank 0 reads on the host after a step: the sampled tokens, their log-probabilities and alternatives, and
the prompt scores asked for, brought over from the device in one transfer."""

from __future__ import annotations

import torch

from llama_dist.engine.transfer import to_device


def logit_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows]: a view when they are the first len(rows) rows (every row samples), else a gather whose indices
    reach the device without a host sync."""
    if rows == list(range(len(rows))):
        return logits[: len(rows)]
    return logits[to_device(torch.tensor(rows, dtype=torch.long), logits.device)]


class HostBatch:
    """What rank 0 needs on the host after sampling, brought over in one transfer."""

    def __init__(self, tokens, logprobs, finite, top, prompt_scores):
        self.tokens, self.logprobs, self.finite, self.top, self.prompt_scores = (
            tokens, logprobs, finite, top, prompt_scores)


def to_host(batch, prompt_scores: list[torch.Tensor]) -> HostBatch:
    """One device-to-host copy of everything a step's bookkeeping reads (float64 holds every token id exactly)."""
    parts, rows, k = [], 0, 0
    if batch is not None:
        rows, k = batch.tokens.shape[0], batch.top_ids.shape[1]
        parts += [batch.tokens.double(), batch.logprobs.double(), batch.finite.double(),
                  batch.top_ids.double().flatten(), batch.top_logprobs.double().flatten()]
    parts += [scores.double().flatten() for scores in prompt_scores]
    values = torch.cat(parts).tolist() if parts else []
    tokens = [int(v) for v in values[:rows]]
    logprobs = values[rows : 2 * rows]
    finite = [v != 0 for v in values[2 * rows : 3 * rows]]
    ids = values[3 * rows : 3 * rows + rows * k]
    lps = values[3 * rows + rows * k : 3 * rows + 2 * rows * k]
    top = [[(int(ids[i * k + j]), lps[i * k + j]) for j in range(k)] for i in range(rows)]
    rest, scores = values[3 * rows + 2 * rows * k :], []
    for tensor in prompt_scores:  # each back to its rows
        width = tensor.shape[1]
        scores.append([rest[i : i + width] for i in range(0, tensor.numel(), width)])
        rest = rest[tensor.numel():]
    return HostBatch(tokens, logprobs, finite, top, scores)
