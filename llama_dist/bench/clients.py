"""The load test's clients: streaming /v1/completions requests timed token by token, many at once, and the
server's own step times read from its /metrics."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

REQUEST_TIMEOUT_S = 900.0


@dataclass
class Timing:
    """One request as its client saw it."""

    ttft_s: float | None  # sent -> first chunk carrying a token (None: it stopped before any)
    total_s: float  # sent -> last chunk
    tokens: int  # generated tokens (the server's usage count): fewer than max_tokens if a stop token came
    chunk_at: list[float] = field(default_factory=list)  # perf_counter() at the arrival of each chunk with tokens

    @property
    def gaps_s(self) -> list[float]:
        """Seconds between consecutive chunks carrying tokens (one token each: logprobs=0)."""
        return [b - a for a, b in zip(self.chunk_at, self.chunk_at[1:])]

    @property
    def per_token_s(self) -> float | None:
        return None if self.tokens < 2 else (self.total_s - self.ttft_s) / (self.tokens - 1)


def stream_completion(client: httpx.Client, url: str, prompt: list[int], max_tokens: int | None, seed: int,
                      chunk_at: list[float] | None = None, stop: threading.Event | None = None) -> Timing:
    """One streaming request. chunk_at: a list to append each token chunk's arrival time to as it comes (others may
    read it meanwhile); stop: when set, the stream is closed at the next chunk (the server aborts the request) and
    its tokens are those received. max_tokens None: as many as fit in max_seq_len."""
    # logprobs=0 makes every token its own chunk, also one that is only part of a character (which would otherwise
    # wait for the rest): TTFT is the first token's arrival. temperature 1 with a seed: reproducible, and a stop
    # token is as unlikely as random weights make it (greedy could hit one on every run).
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "logprobs": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    chunk_at = [] if chunk_at is None else chunk_at
    start = time.perf_counter()
    ttft, tokens, received = None, None, 0
    with client.stream("POST", f"{url}/completions", json=body, timeout=REQUEST_TIMEOUT_S) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the server failed a request: {chunk['error']}")
            count = sum(len(c["logprobs"]["tokens"]) for c in chunk["choices"] if c["logprobs"])
            if count:
                ttft = now - start if ttft is None else ttft
                received += count
                chunk_at.append(now)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if stop is not None and stop.is_set():
                tokens = received
                break
    if tokens is None:
        raise RuntimeError("a request's stream ended without usage")
    return Timing(ttft, time.perf_counter() - start, tokens, chunk_at)


def decode_step_totals(url: str) -> tuple[float, int]:
    """(seconds, count) of the server's decode-only engine steps so far, from its /metrics."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=REQUEST_TIMEOUT_S).raise_for_status().text
    totals = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return totals["llama_dist:engine_decode_step_seconds_sum"], int(totals["llama_dist:engine_decode_step_seconds_count"])


def run_clients(url: str, prompts: list[list[int]], clients: int, requests_per_client: int,
                max_tokens: int) -> tuple[list[Timing], float]:
    """`clients` threads, each sending its requests back to back: (timings, seconds from first sent to last done)."""
    timings: list[Timing] = []
    errors: list[BaseException] = []

    def client_loop(index: int) -> None:
        try:
            with httpx.Client() as client:
                for r in range(requests_per_client):
                    n = index * requests_per_client + r
                    timings.append(stream_completion(client, url, prompts[n % len(prompts)], max_tokens, seed=n))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return timings, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)
