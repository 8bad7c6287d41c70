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
from dataclasses import dataclass
from pathlib import Path

import fire

from llama_dist.bench.clients import Timing, decode_step_totals, percentile, run_clients
from llama_dist.bench.decode import listed
from llama_dist.bench.stall import Stall, format_stall, stall_test
from llama_dist.checkpoint.formats import find_tokenizer
from llama_dist.errors import ConfigError
from llama_dist.text.tokenizer import load_tokenizer

TARGET_CLIENTS, TARGET_SPEEDUP = 16, 5.0  # issue 14: 16 concurrent clients get >= 5x one client's tokens/s
LLAMA3_VOCAB = 128256
START_TIMEOUT_S, STOP_TIMEOUT_S = 900.0, 120.0
KILL_GRACE_S = 15.0
# Prompts are cyclic runs of month or day names from a random start: varied text, and text that even the bundled
# tiny model continues rather than ends (it learnt such runs), so its requests seldom stop early.
CYCLES = ("january february march april may june july august september october november december".split(),
          "monday tuesday wednesday thursday friday saturday sunday".split())


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
        """End the server now. torchrun starts its ranks in sessions of their own, out of reach of a signal to
        its group, and stops them on SIGTERM: so SIGTERM first, and SIGKILL for whatever is left after a while."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


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
