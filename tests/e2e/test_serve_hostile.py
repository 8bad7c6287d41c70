"""Hostile and unlucky clients against the real server (1 process, and 2 ranks under torchrun), while other clients
stream: every case gets its documented status, and the streams' longest gap between two chunks is printed (and
held under a bound generous enough for a busy 2-core machine: the figure the README quotes is the printed one).

The server's chat template is a trap (a publisher's template gone wrong): the last message's content picks a
`range` over 10**12 items, a 10 GB string or 100 MB of output. Run with -s to see the tables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers", reason="transformers writes the test's Hugging Face tokenizer")

from hf_tokenizer import write_hf_checkpoint  # noqa: E402

from llama_dist.bench.serve import ServerProcess  # noqa: E402

REQUEST_TIMEOUT_S = 2.0  # the server's --request_timeout_s here (30 s by default)
MAX_GAP_S = 2.0  # the issue's bound on the other streams' longest gap
TRAP_TEMPLATE = (
    "{%- set last = messages[-1]['content'] %}"
    "{%- if last == 'overflow' %}{% for i in range(10**12) %}{% endfor %}"
    "{%- elif last == 'explode' %}{{ 'x' * 10**10 }}"
    "{%- elif last == 'flood' %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endif %}"
    "{{- bos_token }}{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}"
    "<|eot_id|>{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- endif %}"
)
NO_STOP = {"256": -100, "257": -100, "260": -100}  # placeholder ids, replaced by the tokenizer's own stop ids


@pytest.fixture(scope="module")
def trap_ckpt(tmp_path_factory) -> str:
    ckpt = write_hf_checkpoint(tmp_path_factory, "trap", TRAP_TEMPLATE, seed=3)
    specials = json.loads((ckpt / "tokenizer.json").read_text())["added_tokens"]
    stops = [t["id"] for t in specials if t["content"] in ("<|end_of_text|>", "<|eot_id|>")]
    NO_STOP.clear()
    NO_STOP.update({str(i): -100 for i in stops})  # the streams run to max_tokens: their length is known
    return str(ckpt)


def _start(world_size: int, ckpt: str, log_dir: Path) -> ServerProcess:
    flags = ["--ckpt_dir", ckpt, "--max_batch_size", "4", "--max_seq_len", "2048", "--dtype", "float32",
             "--request_timeout_s", str(REQUEST_TIMEOUT_S)]
    return ServerProcess(world_size, flags, log_dir, env={"OMP_NUM_THREADS": "1", "LLAMA_DIST_TIMEOUT": "60"},
                         start_timeout_s=120)


# ---- the well-behaved clients: streams whose gaps are watched ----------------------------------------------------

class Streams:
    """`n` streaming completions kept running in the background (each started again when it ends); `window()`
    measures the longest gap between two chunks of any of them from now on."""

    def __init__(self, url: str, n: int = 2, max_tokens: int = 400):
        self.url, self.max_tokens = url, max_tokens
        self.longest = 0.0
        self.chunks = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        body = {"prompt": "hello world", "max_tokens": self.max_tokens, "stream": True, "temperature": 0,
                "logit_bias": NO_STOP}
        while not self._stop.is_set():
            try:
                with httpx.stream("POST", f"{self.url}/completions", json=body, timeout=30) as response:
                    last = None
                    for line in response.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.monotonic()
                        if last is not None:
                            self.longest = max(self.longest, now - last)
                        last = now
                        self.chunks += 1
                        if '"error"' in line:
                            self.errors.append(line)
                        if self._stop.is_set():
                            break
            except httpx.HTTPError as e:
                if not self._stop.is_set():
                    self.errors.append(repr(e))
                    time.sleep(0.2)

    def window(self) -> "Streams":
        self.longest, self.chunks = 0.0, 0
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


# ---- the hostile clients: raw sockets, so nothing in between tidies what they send --------------------------------

def _connect(url: str) -> socket.socket:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _status(sock: socket.socket, timeout_s: float = 30) -> int | None:
    """The status of the answer on `sock`, or None if it closed without one."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    finally:
        sock.close()
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


def _headers(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def big_body(url: str) -> int | None:
    sock = _connect(url)
    size = 20 * 2**20
    sock.sendall(_headers("/v1/completions", f"Content-Length: {size}\r\n"))
    try:
        sock.sendall(b'{"prompt": "' + b"a" * 2**20)  # the server answers on the header alone
    except OSError:
        pass
    return _status(sock)


def big_chunked_body(url: str) -> int | None:
    sock = _connect(url)
    sock.sendall(_headers("/v1/completions", "Transfer-Encoding: chunked\r\n"))
    chunk = b"a" * 2**20
    try:
        for _ in range(20):  # 20 MB, refused once past the 4 MB limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass
    return _status(sock)


def slow_headers(url: str) -> int | None:
    sock = _connect(url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")
    try:
        for i in range(int(REQUEST_TIMEOUT_S * 4)):  # a header line every half second, never the end of them
            sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
            time.sleep(0.5)
    except OSError:
        pass
    return _status(sock)


def half_sent_body(url: str) -> int | None:
    sock = _connect(url)
    sock.sendall(_headers("/v1/completions", "Content-Length: 1000\r\n") + b'{"prompt": "one')
    return _status(sock)


def idle_connections(url: str, count: int = 1000) -> tuple[int | None, int]:
    """`count` connections that send nothing; meanwhile a real request. Its status, and how many idle ones the
    server closed (with a 408) once their time was up."""
    idle = [_connect(url) for _ in range(count)]
    real = httpx.post(f"{url}/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=30).status_code
    closed = sum(_status(sock, timeout_s=REQUEST_TIMEOUT_S + 10) == 408 for sock in idle)
    return real, closed


def chat(url: str, content: str) -> tuple[int, str]:
    response = httpx.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                           "max_tokens": 4}, timeout=30)
    return response.status_code, response.json().get("error", {}).get("message", "")


def long_prompt(url: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.post(f"{url}/completions", json={"prompt": "word " * 780_000, "max_tokens": 4}, timeout=30)
    return response.status_code, time.monotonic() - started


# ---- the runs -------------------------------------------------------------------------------------------------------

def _table(world_size: int, rows: list[tuple[str, str, str, float | None]]) -> str:
    lines = [f"hostile clients, {world_size} rank(s), request timeout {REQUEST_TIMEOUT_S:g} s",
             f"{'case':<34} {'expected':<28} {'got':<28} {'longest stream gap':>18}"]
    for case, expected, got, gap in rows:
        lines.append(f"{case:<34} {expected:<28} {got:<28} {'-' if gap is None else f'{gap:.2f} s':>18}")
    return "\n".join(lines)


def _case(streams: Streams, work):
    streams.window()
    result = work()
    time.sleep(0.3)  # a gap still open when the work ended shows in the next chunk
    return result, streams.longest


@pytest.mark.parametrize("world_size", [1, 2])
def test_hostile_clients_get_their_status_while_streams_flow(world_size, trap_ckpt, tmp_path):
    server = _start(world_size, trap_ckpt, tmp_path)
    rows = []
    try:
        streams = Streams(server.url)
        while streams.chunks < 5:  # the streams flow before the first case
            time.sleep(0.1)
        status, gap = _case(streams, lambda: big_body(server.url))
        rows.append(("20 MB body (Content-Length)", "413", str(status), gap))
        status, gap = _case(streams, lambda: big_chunked_body(server.url))
        rows.append(("20 MB body (chunked)", "413", str(status), gap))
        (real, closed), gap = _case(streams, lambda: idle_connections(server.url))
        rows.append(("1000 idle connections", "real 200, idle 408 x1000", f"real {real}, idle 408 x{closed}", gap))
        status, gap = _case(streams, lambda: slow_headers(server.url))
        rows.append(("headers a line per 0.5 s", "408, closed", f"{status}, closed", gap))
        status, gap = _case(streams, lambda: half_sent_body(server.url))
        rows.append(("body stops half-way", "408, closed", f"{status}, closed", gap))
        for content, says in (("overflow", "range of more than"), ("explode", "built a string or list"),
                              ("flood", "output passed")):
            (status, message), gap = _case(streams, lambda: chat(server.url, content))
            rows.append((f"template: {content}", f"400 '{says}'", f"{status} '{says}'" if says in message
                         else f"{status} {message[:40]!r}", gap))
        (status, seconds), gap = _case(streams, lambda: long_prompt(server.url))
        rows.append(("3.9 MB prompt", "400 before tokenizing", f"{status} in {seconds:.2f} s", gap))
        health = httpx.get(server.url.removesuffix("/v1") + "/health", timeout=10).json()
        streams.stop()

        # SIGTERM with streams open: they finish (or, past DRAIN_S, end with a 503 event), a new request gets 503,
        # the server ends cleanly. The streams are long enough to be running still when the new request comes.
        ended, threads, flowing = [], [], threading.Semaphore(0)
        for _ in range(2):
            threads.append(threading.Thread(target=lambda: ended.append(_stream_to_end(server.url, 1800, flowing))))
            threads[-1].start()
        for _ in threads:
            assert flowing.acquire(timeout=60)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the server has heard it
        open_at_sigterm = 2 - len(ended)
        late = httpx.post(f"{server.url}/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        for thread in threads:
            thread.join(timeout=60)
        rc = server.proc.wait(timeout=60)
        rows.append(("SIGTERM mid-stream: open streams", "2 open, each finishes or 503s",
                     f"{open_at_sigterm} open, " + ", ".join(sorted(map(str, ended))), None))
        rows.append(("SIGTERM: a new request", "503 Retry-After", f"{late.status_code} Retry-After "
                     f"{late.headers.get('retry-after')}", None))
        rows.append(("SIGTERM: the server", "exits 0 (torchrun 143)", f"exits {rc}", None))
    finally:
        server.kill()
    print("\n" + _table(world_size, rows))
    assert health["status"] == "ok" and streams.errors == [], (health, streams.errors)
    for case, expected, got, gap in rows:
        if case == "SIGTERM mid-stream: open streams":
            assert got.startswith("2 open, ") and all(reason in ("length", "error: shutting_down")
                                                      for reason in ended), rows
        elif case == "SIGTERM: a new request":
            assert got == "503 Retry-After 5", rows
        elif case == "SIGTERM: the server":
            assert got == ("exits 0" if world_size == 1 else "exits 143"), server.log.read_text()[-3000:]
        elif case == "3.9 MB prompt":
            assert got.startswith("400 in "), rows
        else:
            assert got == expected, (case, rows)
        assert gap is None or gap < MAX_GAP_S, (case, gap)
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]


def _stream_to_end(url: str, max_tokens: int, flowing: threading.Semaphore | None = None) -> str | None:
    """Stream a completion to its end; its finish reason, or "error: ..." for an error event. `flowing` is
    released at its first chunk."""
    body = {"prompt": "hello world", "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "logit_bias": NO_STOP}
    reason = None
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=60) as response:
        if response.status_code != 200:
            return f"status {response.status_code}"
        for line in response.iter_lines():
            if line.startswith("data: {"):
                if flowing is not None:
                    flowing.release()
                    flowing = None
                event = json.loads(line[6:])
                if "error" in event:
                    return f"error: {event['error']['code']}"
                reason = event["choices"][0]["finish_reason"] or reason
    return reason


def _rank_pid(launcher_pid: int, rank: int) -> int:
    for pid in subprocess.run(["pgrep", "-f", "llama_dist serve"], capture_output=True, text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(pid) != launcher_pid and f"RANK={rank}".encode() in environ and any(
                item.startswith(b"TORCHELASTIC_RUN_ID=") for item in environ):
            return int(pid)
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


def test_a_rank_killed_mid_stream_ends_every_request_with_an_error(trap_ckpt, tmp_path):
    server = _start(2, trap_ckpt, tmp_path)
    try:
        streams, threads, plain = [], [], []
        for _ in range(2):
            threads.append(threading.Thread(target=lambda: streams.append(_stream_to_end(server.url, 1500))))
        threads.append(threading.Thread(target=lambda: plain.append(httpx.post(
            f"{server.url}/completions", json={"prompt": "hi", "max_tokens": 1500, "logit_bias": NO_STOP},
            timeout=60))))
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        started = time.monotonic()
        os.kill(_rank_pid(server.proc.pid, 1), signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=60)
        rc = server.proc.wait(timeout=60)
        seconds = time.monotonic() - started
    finally:
        server.kill()
    log = server.log.read_text()
    lines = [line for line in log.splitlines() if line.strip()]
    print(f"\nrank 1 killed: streams {streams}, non-streaming {plain[0].status_code}, server exit {rc} after "
          f"{seconds:.1f} s; its log:\n{log}")
    assert streams == ["error: server_failed"] * 2
    assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "server_failed"
    assert rc == 1 and seconds < 30
    assert len(lines) == 2, log  # one line per rank
    assert lines[0].startswith("llama-dist: error: rank 0 lost contact with another rank")
    assert lines[1].startswith("llama-dist: rank 1 was killed by SIGKILL")
