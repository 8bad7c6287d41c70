"""`python -m llama_dist.bench.serve` end to end on the bundled tiny model: one rank, 1 and 2 clients, 2 requests
each; the table has its rows and its numbers are sane. Bounded by the bench's own timeouts and pytest's clock."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("httpx")

from llama_dist.bench.serve import load_test, percentile  # noqa: E402
from llama_dist.cli import default_checkpoint  # noqa: E402

MAX_TOKENS = 4


def test_percentile_interpolates_between_ranks():
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_load_test_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tiny model gains nothing from more; the machine is shared
    start = time.monotonic()
    rows = load_test(str(default_checkpoint()), nproc=1, clients="1,2", max_batch_size=2, requests_per_client=2,
                     prompt_len=8, max_tokens=MAX_TOKENS, lone_requests=1, dtype="float32",
                     out=str(tmp_path / "table.txt"), log_dir=str(tmp_path))
    seconds = time.monotonic() - start
    table = capsys.readouterr().out
    print(table)
    assert seconds < 60
    assert [(row.ranks, row.clients, len(row.timings)) for row in rows] == [(1, 1, 2), (1, 2, 4)]
    for row in rows:
        assert row.tokens_per_s > 0 and row.prefill_s > 0 and row.decode_step_s > 0
        assert 0 < row.ttft(50) <= row.ttft(99) and row.per_token_s > 0
        for timing in row.timings:  # a request may end early on a stop token (the API has no ignore_eos)
            assert 0 <= timing.tokens <= MAX_TOKENS and timing.total_s > 0
            assert timing.ttft_s is None or 0 < timing.ttft_s <= timing.total_s
    assert rows[0].speedup == pytest.approx(1.0)
    assert rows[1].ttft_bound_s == pytest.approx(2 * rows[1].prefill_s + rows[1].decode_step_s)
    lines = [line for line in table.splitlines() if line.startswith("| 1 |")]
    assert [line.split("|")[4].strip() for line in lines] == ["1", "2"]  # the clients column
    assert (tmp_path / "table.txt").read_text().strip() == table.strip()
