"""The load test's long-prompt scenario: streams running when a long prompt arrives, and the gaps between their
tokens while it is admitted (chunked prefill keeps them short)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import httpx

from llama_dist.bench.clients import REQUEST_TIMEOUT_S, Timing, percentile, stream_completion

JOIN_TIMEOUT_S = 120.0  # for the stream threads to end once told to


@dataclass
class Stall:
    """The long-prompt scenario at one rank count: the running streams' token arrival times and the long request."""

    ranks: int
    prompt_len: int  # of the long request
    streams: list[Timing]
    warm_at: float  # perf_counter() when every stream had its first tokens (or had ended)
    sent_at: float  # when the long request was sent
    long: Timing

    def gaps(self, start: float = -math.inf, end: float = math.inf) -> list[float]:
        """Gaps between consecutive tokens of the streams, from warm_at on, that end within [start, end]."""
        return [b - a for t in self.streams for a, b in zip(t.chunk_at, t.chunk_at[1:])
                if a >= self.warm_at and start <= b <= end]

    @property
    def first_token_at(self) -> float:
        return self.sent_at + (self.long.ttft_s if self.long.ttft_s is not None else self.long.total_s)

    @property
    def running(self) -> int:
        """Streams that still had tokens coming after the long request's first token."""
        return sum(1 for t in self.streams if t.chunk_at and t.chunk_at[-1] > self.first_token_at)


def _gap_line(label: str, gaps: list[float]) -> str:
    if not gaps:
        return f"| {label} | 0 | - | - | - | - | - |"
    median, p99, longest = percentile(gaps, 50), percentile(gaps, 99), max(gaps)
    return (f"| {label} | {len(gaps)} | {median * 1e3:.0f} | {p99 * 1e3:.0f} | {longest * 1e3:.0f} "
            f"| {p99 / median:.1f}x | {longest / median:.1f}x |")


def format_stall(stall: Stall, batched_tokens: int | None) -> str:
    # A first token that is a stop token ends the request without a token chunk: then the time to its end.
    ttft = (f"{stall.long.total_s:.3f} s (its first token was a stop token: the time to its end)"
            if stall.long.ttft_s is None else f"{stall.long.ttft_s:.3f} s")
    budget = ""
    if batched_tokens is not None:
        chunks = math.ceil(stall.prompt_len / max(batched_tokens - len(stall.streams), 1))
        budget = f"; budget {batched_tokens} tokens a step: about {chunks} prefill chunks beside the decodes"
    header = (f"Long prompt admitted mid-stream, {stall.ranks} rank(s): {len(stall.streams)} streams running, then "
              f"one {stall.prompt_len}-token prompt{budget}")
    long = (f"Long request: time to first token {ttft}; {stall.running} stream(s) still running at its first token; "
            f"tokens received per stream: {', '.join(str(len(t.chunk_at)) for t in stall.streams)}")
    lines = [header, long,
             ("| gaps between a running stream's consecutive tokens | gaps | median ms | p99 ms | longest ms "
              "| p99 / median | longest / median |"),
             "|---|---|---|---|---|---|---|",
             _gap_line("all, whole window", stall.gaps()),
             _gap_line("before the long prompt", stall.gaps(end=stall.sent_at)),
             _gap_line("ending while it is admitted (sent -> its first token)",
                       stall.gaps(stall.sent_at, stall.first_token_at)),
             _gap_line("after its first token", stall.gaps(start=stall.first_token_at))]
    early = [t for t in stall.streams if t.chunk_at and t.chunk_at[-1] <= stall.first_token_at]
    if early:
        lines.append(f"{len(early)} stream(s) ended before the long request's first token (a stop token or "
                     "max_seq_len): only their tokens until then are counted")
    return "\n".join(lines)


def stall_test(url: str, ranks: int, stream_prompts: list[list[int]], long_prompt: list[int], warm_tokens: int = 2,
               before_tokens: int = 16, after_tokens: int = 8, seed: int = 0) -> Stall:
    """Stream one completion per prompt of `stream_prompts` (as many tokens as fit); the gaps count once each has
    `warm_tokens` tokens (its prompt is in); after `before_tokens` more each from then (or its end), send
    `long_prompt` and wait for its first token; let every stream get `after_tokens` more, then close them all (the
    server aborts them)."""
    chunk_lists: list[list[float]] = [[] for _ in stream_prompts]
    timings: list[Timing | None] = [None] * len(stream_prompts)
    done = [threading.Event() for _ in stream_prompts]
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            with httpx.Client() as client:
                timings[i] = stream_completion(client, url, stream_prompts[i], None, seed=10_000 + i,
                                               chunk_at=chunk_lists[i], stop=stop)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            done[i].set()

    def wait_for(counts: list[int]) -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while not all(len(c) >= n or d.is_set() for c, n, d in zip(chunk_lists, counts, done)):
            if errors:
                raise errors[0]
            if time.monotonic() > deadline:
                raise RuntimeError("the streams of the long-prompt scenario made no progress in time")
            time.sleep(0.005)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(stream_prompts))]
    try:
        for thread in threads:
            thread.start()
        wait_for([warm_tokens] * len(threads))
        warm_at = time.perf_counter()
        wait_for([len(c) + before_tokens for c in chunk_lists])
        with httpx.Client() as client:
            sent_at = time.perf_counter()
            long = stream_completion(client, url, long_prompt, 1, seed=seed)
        wait_for([len(c) + after_tokens for c in chunk_lists])
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=JOIN_TIMEOUT_S)
    if errors:
        raise errors[0]
    streams = [t if t is not None else Timing(None, 0.0, len(c), c) for t, c in zip(timings, chunk_lists)]
    return Stall(ranks, len(long_prompt), streams, warm_at, sent_at, long)
