"""Load test of `llama-dist serve`: `python -m llama_dist.bench serve --ckpt_dir DIR --nproc 1,2 --clients 1,4,16`.

For each rank count it starts the server (one process, or llama_dist.torchrun for N ranks), times lone requests
(prefill ~ time to first token, decode step ~ the time between later tokens), then for each client count runs that
many concurrent clients, each sending `requests_per_client` streaming /v1/completions back to back, and prints one
row per client count: generated tokens/s, speedup over one client, p50/p99 time to first token (TTFT), time per
output token, and the two targets of issue 14: 16 clients get >= 5x one client's tokens/s (at 16 slots), and p99
TTFT stays under 2 x prefill + one decode step per queued prefill (c - 1 for c clients); a line after the table sets
the time per output token at the largest client count beside the median gap between a stream's tokens there (about
one decode step of that many rows) and the lone request's decode step.

With --stall_prompt_len P (off by default), the "long prompt admitted mid-stream" scenario follows on the same
server: --stall_clients K streams generate (as many tokens as fit), and once each has a few tokens one request with a
P-token prompt arrives; it prints the gaps between consecutive tokens of the running streams (median, p99, longest
and their ratios, over the whole window and during the admission) and the long request's time to first token.
Server flags: --max_num_batched_tokens and --max_seq_len are forwarded when given, any other through
--server_flags="--flag value ..." (with "=": fire would take a value starting with "--" for a flag of its own).

Then SIGTERM stops the server and its exit is checked. Needs httpx, and for a checkpoint without a tokenizer
llama-models (the `test` extra).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import fire
import httpx
from prometheus_client.parser import text_string_to_metric_families

from llama_dist.bench.decode import listed
from llama_dist.checkpoint.formats import find_tokenizer
from llama_dist.errors import ConfigError
from llama_dist.text.tokenizer import load_tokenizer

TARGET_CLIENTS, TARGET_SPEEDUP = 16, 5.0  # issue 14: 16 concurrent clients get >= 5x one client's tokens/s
LLAMA3_VOCAB = 128256
START_TIMEOUT_S, STOP_TIMEOUT_S, REQUEST_TIMEOUT_S = 900.0, 120.0, 900.0
# Prompts are cyclic runs of month or day names from a random start: varied text, and text that even the bundled
# tiny model continues rather than ends (it learnt such runs), so its requests seldom stop early.
CYCLES = ("january february march april may june july august september october november december".split(),
          "monday tuesday wednesday thursday friday saturday sunday".split())


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


@dataclass
class Row:
    """One client count at one rank count: a row of the table."""

    ranks: int
    clients: int
    timings: list[Timing]
    elapsed_s: float  # first request sent -> last request done, all clients
    prefill_s: float  # of a lone request, for the TTFT bound
    decode_step_s: float
    speedup: float | None = None  # tokens/s over the 1-client row of the same rank count
    server_decode_step_s: float = math.nan  # the server's own decode-only steps during the row (its /metrics)

    @property
    def tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.timings) / self.elapsed_s

    @property
    def ttft_bound_s(self) -> float:
        return 2 * self.prefill_s + (self.clients - 1) * self.decode_step_s

    def ttft(self, q: float) -> float:
        return percentile([t.ttft_s for t in self.timings if t.ttft_s is not None], q)

    @property
    def per_token_s(self) -> float:
        steps = [t.per_token_s for t in self.timings if t.per_token_s is not None]
        return sum(steps) / len(steps) if steps else math.nan

    def gap(self, q: float) -> float:
        """Percentile q of the gaps between consecutive tokens of a stream, over every request of the row."""
        return percentile([g for t in self.timings for g in t.gaps_s], q)

    @property
    def speedup_ok(self) -> bool | None:
        return None if self.clients != TARGET_CLIENTS or self.speedup is None else self.speedup >= TARGET_SPEEDUP


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def pick_tokenizer(ckpt_dir: str, tokenizer_path: str | None) -> Path:
    """The checkpoint's tokenizer; for a `bench make-checkpoint` directory (weights only) with Llama 3's vocabulary,
    Meta's Llama 3 tokenizer from the installed llama_models package: the server needs one to start."""
    if tokenizer_path:
        return Path(tokenizer_path)
    try:
        return find_tokenizer(ckpt_dir)
    except FileNotFoundError:
        pass
    params = Path(ckpt_dir) / "params.json"
    vocab = json.loads(params.read_text()).get("vocab_size") if params.is_file() else None
    # make-checkpoint's shapes have Llama 3's vocabulary, so its tokenizer fits (and any ids decode).
    spec = importlib.util.find_spec("llama_models")
    if vocab == LLAMA3_VOCAB and spec and spec.submodule_search_locations:
        candidate = Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{ckpt_dir} has no tokenizer and no Llama 3 one fits its vocabulary ({vocab}): "
                      "pass --tokenizer_path")


def make_prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids, cut from text (see CYCLES). Sent as ids so every prompt has
    the same length whatever the tokenizer."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        cycle, start = rng.choice(CYCLES), rng.randrange(12)
        text = " ".join(cycle[(start + i) % len(cycle)] for i in range(2 * length))
        prompts.append(tokenizer.encode(text, bos=True, eos=False)[:length])  # a word is >= 1 token
    return prompts


class ServerProcess:
    """`llama-dist serve --port 0` as a subprocess (under llama_dist.torchrun for more than one rank)."""

    def __init__(self, ranks: int, serve_flags: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 start_timeout_s: float = START_TIMEOUT_S):
        """env: variables to set for the server besides this process's own."""
        launcher = [sys.executable] if ranks == 1 else [
            sys.executable, "-m", "llama_dist.torchrun", "--standalone", "--nproc_per_node", str(ranks)]
        # A launcher's variables from an outer job would make the server read the wrong layout.
        server_env = {k: v for k, v in os.environ.items()
                      if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        repo = str(Path(__file__).resolve().parents[1])
        server_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, server_env.get("PYTHONPATH")) if p)
        server_env.update(env or {})
        self.log = log_dir / f"serve-{ranks}ranks.log"
        self.lines: list[str] = []
        with open(self.log, "w") as err:
            # A session of its own: a failed start can be killed whole (torchrun and its ranks).
            self.proc = subprocess.Popen([*launcher, "-m", "llama_dist", "serve", "--port", "0", *serve_flags],
                                         env=server_env, stdout=subprocess.PIPE, stderr=err, text=True,
                                         start_new_session=True)
        threading.Thread(target=self._read_stdout, daemon=True).start()  # a full pipe would block the server
        self.url = self._wait_for_url(start_timeout_s)

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def _wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in list(self.lines):
                if match := re.search(r"Serving .* at (http://\S+/v1)", line):
                    return match.group(1)
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server did not start (see {self.log}):\n{self.log.read_text()[-2000:]}")

    def stop(self) -> int:
        """SIGTERM (torchrun passes it on to the ranks); raises if it does not end cleanly in time."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the server did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM") from None
        time.sleep(0.5)  # let the reader thread take the last lines
        # torchrun's agent exits 128 + SIGTERM after stopping its ranks; rank 0 says whether it stopped cleanly.
        if rc not in (0, 128 + signal.SIGTERM) or not any("Server stopped" in line for line in self.lines):
            raise RuntimeError(f"the server ended with status {rc} (see {self.log}):\n{self.log.read_text()[-2000:]}")
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


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


def format_table(rows: list[Row], prompt_len: int, max_tokens: int, max_batch_size: int) -> str:
    def mark(ok: bool | None) -> str:
        return "-" if ok is None else ("pass" if ok else "FAIL")

    lines = [f"prompt {prompt_len} tokens, max_tokens {max_tokens}, {max_batch_size} slots; prefill and decode step "
             f"from lone requests; TTFT bound = 2 x prefill + (clients - 1) x decode step",
             "| ranks | prefill s | decode step ms | clients | requests | generated tok/s | speedup vs 1 client "
             f"| TTFT p50 s | TTFT p99 s | TTFT bound s | ms per output token | >= {TARGET_SPEEDUP:g}x at "
             f"{TARGET_CLIENTS} clients | p99 TTFT <= bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup = "-" if row.speedup is None else f"{row.speedup:.2f}x"
        ttft_ok = None if math.isnan(row.ttft_bound_s) else row.ttft(99) <= row.ttft_bound_s
        lines.append(
            f"| {row.ranks} | {row.prefill_s:.3f} | {row.decode_step_s * 1e3:.0f} | {row.clients} "
            f"| {len(row.timings)} | {row.tokens_per_s:.1f} | {speedup} | {row.ttft(50):.3f} | {row.ttft(99):.3f} "
            f"| {row.ttft_bound_s:.3f} | {row.per_token_s * 1e3:.0f} | {mark(row.speedup_ok)} | {mark(ttft_ok)} |")
    for ranks in dict.fromkeys(row.ranks for row in rows):
        last = max((r for r in rows if r.ranks == ranks), key=lambda r: r.clients)
        lines.append(
            f"{ranks} rank(s), {last.clients} clients: time per output token {last.per_token_s * 1e3:.0f} ms; median "
            f"gap between a stream's tokens {last.gap(50) * 1e3:.0f} ms (about one decode step of up to "
            f"{min(last.clients, max_batch_size)} rows; p99 {last.gap(99) * 1e3:.0f} ms); lone request's decode step "
            f"(1 row) {last.decode_step_s * 1e3:.0f} ms; the server's own decode-only steps meanwhile "
            f"{last.server_decode_step_s * 1e3:.0f} ms on average (time per output token "
            f"{last.per_token_s / last.server_decode_step_s:.2f}x of it)")
    early = sum(t.tokens < max_tokens for row in rows for t in row.timings)
    if early:  # the API has no ignore_eos: tokens/s counts what was generated, TTFT only requests that had a token
        lines.append(f"{early} request(s) ended on a stop token before max_tokens")
    return "\n".join(lines)


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
            thread.join(timeout=STOP_TIMEOUT_S)
    if errors:
        raise errors[0]
    streams = [t if t is not None else Timing(None, 0.0, len(c), c) for t, c in zip(timings, chunk_lists)]
    return Stall(ranks, len(long_prompt), streams, warm_at, sent_at, long)


def merge_flags(defaults: list[str], extra: list[str]) -> list[str]:
    """`defaults` (pairs of --name value) without the names `extra` gives, then `extra`: its values win."""
    given = {flag.lstrip("-").split("=", 1)[0].replace("-", "_") for flag in extra if flag.startswith("--")}
    if "max_num_seqs" in given:  # the server's alias: it wins over --max_batch_size anyway
        given.add("max_batch_size")
    kept = []
    for name, value in zip(defaults[::2], defaults[1::2]):
        if name.lstrip("-") not in given:
            kept += [name, value]
    return kept + extra


def flag_value(flags: list[str], name: str) -> int | None:
    """The last value of --name (--name V or --name=V) in `flags`, as an int; None if absent."""
    value = None
    for i, flag in enumerate(flags):
        if flag == f"--{name}" and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(f"--{name}="):
            value = flag.split("=", 1)[1]
    return None if value is None else int(value)


def load_test(ckpt_dir: str, nproc=(1, 2), clients=(1, 4, 16), max_batch_size: int = 16,
              requests_per_client: int = 3, prompt_len: int = 32, max_tokens: int = 32, lone_requests: int = 2,
              dtype: str = "bfloat16", tokenizer_path: str | None = None, seed: int = 0,
              out: str | None = None, log_dir: str | None = None, max_num_batched_tokens: int | None = None,
              max_seq_len: int | None = None, server_flags: str | list | tuple = "",
              stall_prompt_len: int | None = None, stall_clients: int = 4) -> list[Row]:
    """Run the load test (see the module docstring), print the table (and write it to `out`); the rows.

    clients: client counts, comma-separated; 0 alone: no load-test rows (the lone requests and the long-prompt
    scenario only).
    lone_requests: requests timed one at a time (after one warm-up) for the prefill time and decode step.
    log_dir: where the servers' stderr goes (default: a temporary directory).
    max_num_batched_tokens: the server's step token budget (default: the server's).
    max_seq_len: the server's (default: prompt_len + max_tokens; with the long prompt at least
    prompt_len + stall_prompt_len + 16, so that the streams outlast its admission).
    server_flags: more flags for `llama-dist serve`, as one string (--server_flags="--flag value ...") or a list;
    they replace the bench's own of the same name.
    stall_prompt_len: tokens of the long prompt sent once --stall_clients streams are running (0 or None: off)."""
    client_counts = [c for c in listed(clients) if c != 0]
    if lone_requests < 1 or requests_per_client < 1 or min(client_counts, default=1) < 1:
        raise ConfigError("lone_requests, requests_per_client and every client count must be at least 1")
    tokenizer = load_tokenizer(tokenizer_file := pick_tokenizer(ckpt_dir, tokenizer_path))
    prompts = make_prompts(tokenizer, max(client_counts, default=0) * requests_per_client + lone_requests + 1,
                           prompt_len, seed)
    if max_seq_len is None:
        # Room for the long prompt, and for the streams to outlast its admission (at least a token a step).
        max_seq_len = max(prompt_len + max_tokens, prompt_len + (stall_prompt_len or -16) + 16)
    elif stall_prompt_len and max_seq_len <= stall_prompt_len:
        raise ConfigError(f"--max_seq_len {max_seq_len} leaves no room for the {stall_prompt_len}-token prompt")
    extra = shlex.split(server_flags) if isinstance(server_flags, str) else [str(f) for f in server_flags]
    if max_num_batched_tokens is not None:
        extra = ["--max_num_batched_tokens", str(max_num_batched_tokens), *extra]
    serve_flags = merge_flags(["--ckpt_dir", ckpt_dir, "--tokenizer_path", str(tokenizer_file), "--dtype", dtype,
                               "--max_batch_size", str(max_batch_size), "--max_seq_len", str(max_seq_len),
                               # Every client's request may wait at once: none may be refused with 429.
                               "--max_queue", str(max([64, *client_counts]))], extra)
    batched_tokens = flag_value(serve_flags, "max_num_batched_tokens")  # None: the server's default
    max_batch_size = flag_value(serve_flags, "max_num_seqs") or flag_value(serve_flags, "max_batch_size")
    if stall_prompt_len and not 1 <= stall_clients < max_batch_size:
        raise ConfigError(f"--stall_clients must be 1 to max_batch_size - 1 ({max_batch_size - 1}): the long "
                          f"request needs a free slot, got {stall_clients}")
    logs = Path(log_dir or tempfile.mkdtemp(prefix="bench_serve-"))
    logs.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    stalls: list[Stall] = []
    for ranks in listed(nproc):
        server = ServerProcess(ranks, serve_flags, logs)
        print(f"{ranks} rank(s): serving at {server.url}", file=sys.stderr, flush=True)
        try:
            # The first request pays one-off costs (allocations, lazy initialisation): not measured.
            run_clients(server.url, prompts[-1:], 1, 1, max_tokens)
            lone, _ = run_clients(server.url, prompts[-1 - lone_requests:-1], 1, lone_requests, max_tokens)
            prefill_s = percentile([t.ttft_s for t in lone if t.ttft_s is not None], 50)
            decode_step_s = percentile([t.per_token_s for t in lone if t.per_token_s is not None], 50)
            for count in client_counts:
                steps_before = decode_step_totals(server.url)
                timings, elapsed = run_clients(server.url, prompts, count, requests_per_client, max_tokens)
                steps_after = decode_step_totals(server.url)
                rows.append(Row(ranks, count, timings, elapsed, prefill_s, decode_step_s))
                if steps_after[1] > steps_before[1]:
                    rows[-1].server_decode_step_s = ((steps_after[0] - steps_before[0])
                                                     / (steps_after[1] - steps_before[1]))
                print(f"  {count} client(s): {rows[-1].tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
            if stall_prompt_len:
                stall_prompts = make_prompts(tokenizer, stall_clients, prompt_len, seed + 1)
                long_prompt = make_prompts(tokenizer, 1, stall_prompt_len, seed + 2)[0]
                stalls.append(stall_test(server.url, ranks, stall_prompts, long_prompt, seed=seed))
                waited = stalls[-1].first_token_at - stalls[-1].sent_at
                print(f"  long prompt: first token after {waited:.3f} s", file=sys.stderr, flush=True)
        except BaseException:
            server.kill()
            raise
        print(f"{ranks} rank(s): stopped (exit status {server.stop()})", file=sys.stderr, flush=True)
    for row in rows:
        single = next((r for r in rows if r.ranks == row.ranks and r.clients == 1), None)
        row.speedup = None if single is None else row.tokens_per_s / single.tokens_per_s
    table = "\n\n".join([format_table(rows, prompt_len, max_tokens, max_batch_size)] * bool(rows)
                         + [format_stall(stall, batched_tokens) for stall in stalls])
    print(table)
    if out:
        Path(out).write_text(table + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    # The table is printed; the rows are for callers.
    fire.Fire(load_test, command=argv, name="python -m llama_dist.bench serve", serialize=lambda rows: None)


if __name__ == "__main__":
    main()
