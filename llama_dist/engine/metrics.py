"""What the engine did, filled each step on rank 0: queue sizes, tokens prefilled and decoded, time to first
token, time between tokens, end-to-end latency, step times and cache use. The benchmarks read it; the server's
/metrics (serve/metrics.py) reads its counters and hears each latency as it is recorded (`listeners`)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

RECENT = 4096  # latencies kept for percentiles


@dataclass
class EngineMetrics:
    steps: int = 0
    num_waiting: int = 0
    num_running: int = 0
    cache_usage: float = 0.0  # share of the KV cache in use after the last step
    prompt_tokens: int = 0  # prefilled (prompt tokens computed), in all
    generation_tokens: int = 0  # sampled, in all
    finished_requests: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, found (not computed again)
    spec_drafts: int = 0  # speculative rows verified (one per sequence and step that had guesses)
    spec_draft_tokens: int = 0  # tokens guessed in them
    spec_accepted_tokens: int = 0  # of those, kept
    step_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))
    decode_step_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))  # decodes only
    time_to_first_token_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))
    inter_token_latency_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))
    e2e_latency_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))
    # Called as listener(name, seconds) for each latency recorded, name one of the deques' names above.
    listeners: list = field(default_factory=list)

    def _record(self, name: str, seconds: float) -> None:
        getattr(self, name).append(seconds)
        for listener in self.listeners:
            listener(name, seconds)

    def token_generated(self, seq, now: float) -> None:
        self.generation_tokens += 1
        if seq.first_token_s is None:
            seq.first_token_s = now
            self._record("time_to_first_token_s", now - seq.arrival_s)
        else:
            self._record("inter_token_latency_s", now - seq.last_token_s)
        seq.last_token_s = now

    def speculated(self, guessed: int, kept: int) -> None:
        self.spec_drafts += 1
        self.spec_draft_tokens += guessed
        self.spec_accepted_tokens += kept

    @property
    def acceptance_rate(self) -> float | None:
        """The share of guessed tokens kept (speculative decoding), None before any."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a speculative row gave on average: its kept guesses and the model's own one."""
        return (self.spec_accepted_tokens + self.spec_drafts) / self.spec_drafts if self.spec_drafts else None

    def step_done(self, chunks, seconds: float, scheduler) -> None:
        self.steps += 1
        self._record("step_s", seconds)
        # A decode computes one token past the prompt (read after the step: the sequence has grown since).
        if all(c.num_tokens == 1 and c.start >= c.seq.num_prompt_tokens for c in chunks):
            self._record("decode_step_s", seconds)
        self.prompt_tokens += sum(max(0, min(c.start + c.num_tokens, c.seq.num_prompt_tokens) - c.start) for c in chunks)
        for chunk in chunks:
            if chunk.seq.is_finished:
                self.finished_requests += 1
                self._record("e2e_latency_s", (chunk.seq.last_token_s or chunk.seq.arrival_s) - chunk.seq.arrival_s)
        self.num_waiting, self.num_running = len(scheduler.waiting), len(scheduler.running)
        blocks = scheduler.block_manager
        self.cache_usage = blocks.usage
        self.preemptions = scheduler.num_preemptions
        self.prefix_cache_queries, self.prefix_cache_hits = blocks.queries, blocks.hits
