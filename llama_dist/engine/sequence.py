"""One request inside the engine: its tokens, where it stands, where its keys and values live, and what it has
produced so far; apart from any HTTP object. What `LLMEngine.step` hands back for it is a `RequestOutput`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.structured_output import Guide
from llama_dist.text.detokenizer import CompletionText


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued; nothing of it is in the cache
    RUNNING = "running"  # holds a cache row; prefilling (in chunks) or decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: object
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]  # what ends it: the request's stop ids, and the tokenizer's unless ignore_eos
    max_tokens: int  # new tokens at most (the request's, cut where max_seq_len ends)
    generator: torch.Generator | None = None  # its own random stream (a seed), else the engine's
    arrival_s: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose keys and values are in the cache
    num_draft_computed: int = 0  # the same in the draft model's cache (speculative decoding with a draft model)
    block_table: list[int] = field(default_factory=list)  # the cache blocks holding its tokens, in order
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_preemptions: int = 0  # times its blocks were taken back (it is recomputed from its tokens)
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
    # Per output token: its log-probability and the top alternatives (when asked); per prompt token the same for
    # prompt_logprobs (None for the first: nothing precedes it).
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)  # with top_logprobs
    first_token_s: float | None = None
    last_token_s: float | None = None
    text: CompletionText | None = None  # its text as it grows (stop strings are checked there), when asked
    guide: Guide | None = None  # its grammar's state (structured output), when it has one
    prompt_leader: Sequence | None = None  # a choice of the same prompt whose prefill this one waits for (n > 1)

    @property
    def waits_for_its_prompt(self) -> bool:
        """Its prompt is being computed by its leader: started now, it would compute it again."""
        leader = self.prompt_leader
        return leader is not None and not leader.is_finished and (
            leader.status == SequenceStatus.WAITING or leader.prefilling)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output."""
        prompt = self.prompt_token_ids
        if stop <= len(prompt):
            return prompt[start:stop]
        return (prompt[start:] if start < len(prompt) else []) + self.output_token_ids[
            max(0, start - len(prompt)) : stop - len(prompt)]

    @property
    def prefilling(self) -> bool:
        """More than its newest token is not in the cache yet (a prompt, or everything after a preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


@dataclass
class RequestOutput:
    """What one step brought one request: its new tokens (and their log-probabilities when asked), and how it
    ended once it has. `text` is left to the caller's detokenizer (text/detokenizer.py)."""

    request_id: object
    new_token_ids: list[int]
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list[float | None] | None = None  # once, with the request's first output
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # the same, when top_logprobs too
    text: str = ""  # the text released by this step (requests with stop strings or detokenize=True)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache
