"""Measured kernel choice (`model.kernel_choice`) on loaded tiny models: the cache is used and invalidated, the
measured and every forced choice give the static rule's logits, ranks agree on rank 0's choice.

These tests opt in to measuring (the suite builds with LLAMA_DIST_KERNEL_CHOICE=static, tests/conftest.py); the
tiny models' weights time in microseconds and max_seq_len is kept small, so measuring takes well under a second.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from helpers import rel_diff, tiny_args, write_checkpoint

from llama_dist import cli
from llama_dist.checkpoint.loader import load_model
from llama_dist.config import CACHE_ENV
from llama_dist.dist.groups import init_distributed, shutdown_distributed
from llama_dist.dist.local_launch import run_local
from llama_dist.model import kernel_choice, native
from llama_dist.model.kernel_choice import choose_kernels
from llama_dist.model.kernels import (
    KERNELS,
    candidates,
    install_kernel_table,
    installed_kernel_table,
)

# Five distinct weight shapes: wqkv 128x64, wo 64x64, w13 384x64, w2 64x192, output 256x64.
ARGS = tiny_args(dim=64, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
OTHER_SHAPES = tiny_args(dim=96, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
TOKENS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
RUNTIME = {"max_seq_len": 16, "max_batch_size": 2}  # rows up to 32: buckets 1, 2-7 and 8-63


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_choice")
    write_checkpoint(root / "tiny", ARGS, seed=4)
    write_checkpoint(root / "other", OTHER_SHAPES, seed=5)
    return root


@pytest.fixture
def group(monkeypatch, tmp_path):
    """A one-rank group in this process, the cache in tmp_path, and the static table again afterwards."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    init_distributed()
    try:
        yield tmp_path / "cache"
    finally:
        install_kernel_table({})
        shutdown_distributed()


class CountingTimer:
    """Stands in for time_candidates: counts the (weight shape, bucket) pairs timed, and times them really."""

    def __init__(self, monkeypatch):
        self.keys: list[tuple] = []
        self.real = kernel_choice.time_candidates
        monkeypatch.setattr(kernel_choice, "time_candidates", self)

    def __call__(self, key, rows, weights):
        self.keys.append(key)
        return self.real(key, rows, weights)


def test_measure_then_read_the_cache_then_invalidate_it(checkpoints, group, monkeypatch, capsys):
    model = load_model(checkpoints / "tiny", **RUNTIME)
    timer = CountingTimer(monkeypatch)
    table = choose_kernels(model, "measure")
    out = capsys.readouterr().out
    assert "Kernels: measured" in out and "cached in" in out, out
    # Every distinct weight shape (wqkv, wo, w13, w2, output) in every bucket it reaches: the output sees
    # max_batch_size rows, the others max_batch_size x max_seq_len.
    assert len({key[:-1] for key in table}) == 5
    assert {key[-1] for key in table} == {0, 1, 2}
    assert {key[-1] for key in table if key[1] == ARGS.vocab_size} == {0, 1}
    assert set(timer.keys) == set(table) and installed_kernel_table() == table
    assert all(name in KERNELS[key[0]] for key, name in table.items())
    files = list(group.iterdir())
    assert len(files) == 1 and files[0].name.startswith("kernels-")

    # The next build reads the table instead of timing.
    timer.keys.clear()
    install_kernel_table({})
    assert choose_kernels(model, "measure") == table and timer.keys == []
    assert "read from" in capsys.readouterr().out and installed_kernel_table() == table

    # Another model: only its new shapes are timed, and they join the same file.
    other = load_model(checkpoints / "other", **RUNTIME)
    other_table = choose_kernels(other, "measure")
    assert set(timer.keys) == set(other_table) - set(table) and timer.keys
    assert kernel_choice.read_cache(files[0], kernel_choice.machine_identity()) == {**table, **other_table}

    # Another CPU, torch version or thread count: another key, timed afresh into another file.
    for patch in [lambda m: m.setattr(kernel_choice, "cpu_model", lambda: "Another CPU"),
                  lambda m: m.setattr(torch, "__version__", "0.0.0+other"),
                  lambda m: torch.set_num_threads(torch.get_num_threads() + 1)]:
        threads = torch.get_num_threads()
        with monkeypatch.context() as m:
            patch(m)
            try:
                timer.keys.clear()
                choose_kernels(model, "measure")
                assert set(timer.keys) == set(table)
            finally:
                torch.set_num_threads(threads)
    assert len(list(group.iterdir())) == 4

    # A corrupt file is ignored (timed afresh) and replaced.
    files[0].write_text("{ not json")
    timer.keys.clear()
    assert set(choose_kernels(model, "measure")) == set(table) and set(timer.keys) == set(table)
    assert kernel_choice.read_cache(files[0], kernel_choice.machine_identity()).keys() == table.keys()
    capsys.readouterr()

    # static: the fixed rules, nothing timed or printed.
    assert choose_kernels(model, "static") == {} and installed_kernel_table() == {}
    assert capsys.readouterr().out == ""


def test_the_budget_leaves_the_rest_to_the_next_start(checkpoints, group, monkeypatch, capsys):
    model = load_model(checkpoints / "tiny", **RUNTIME)
    pairs = len(kernel_choice.timing_items(model))
    timer = CountingTimer(monkeypatch)
    assert choose_kernels(model, "measure", budget_s=0) == {} and timer.keys == []
    assert f"{pairs} left to the static rule" in capsys.readouterr().out
    # A clock that ticks once a look: a budget of two pairs, the one-row bucket's first two, the output first.
    clock = itertools.count()
    monkeypatch.setattr(kernel_choice, "_now", lambda: next(clock))
    first = choose_kernels(model, "measure", budget_s=3)
    assert len(first) == 2 and all(key[-1] == 0 for key in first)
    assert timer.keys[0][:3] == ("dense", ARGS.vocab_size, ARGS.dim)
    assert f"{pairs - 2} left to the static rule" in capsys.readouterr().out
    monkeypatch.setattr(kernel_choice, "_now", time.perf_counter)
    second = choose_kernels(model, "measure")  # the rest now, the first two from the cache
    assert first.items() <= second.items() and len(second) == pairs
    assert set(timer.keys) == set(second)


def test_a_compiled_kernel_in_the_cache_is_built_only_for_its_model(checkpoints, group, monkeypatch, capsys):
    """The cache file holds every model's entries: a bf16 model's start must not build (or load) the compiled int8
    kernel an int8 model's entries name, and an int8 model's start where it cannot be built measures those weights
    again instead of running a kernel it does not have."""
    int8 = load_model(checkpoints / "tiny", quantize="int8", **RUNTIME)
    dense = load_model(checkpoints / "other", **RUNTIME)
    int8_keys = [key for key, _, _ in kernel_choice.timing_items(int8) if key[0] == "int8"]
    identity = kernel_choice.machine_identity()
    kernel_choice.write_cache(kernel_choice.cache_path(identity), identity, dict.fromkeys(int8_keys, "native"))
    asked = []
    monkeypatch.setattr(native, "int8_rows_available", lambda: asked.append(1) or False)
    choose_kernels(dense, "measure")
    assert asked == []
    timer = CountingTimer(monkeypatch)
    table = choose_kernels(int8, "measure")
    assert asked and set(int8_keys) <= set(timer.keys)
    assert "native" not in table.values() and "native" not in installed_kernel_table().values()
    capsys.readouterr()


def _forced_tables(model, dtype):
    """Tables choosing, for each key, the i-th candidate (cycling): between them every candidate of every key."""
    items = kernel_choice.timing_items(model)
    most = max(len(candidates(key[0], dtype, rows)) for key, rows, _ in items)
    for i in range(most):
        yield {key: (names := candidates(key[0], dtype, rows))[i % len(names)] for key, rows, _ in items}


@pytest.mark.parametrize("dtype, quantize, tolerance", [(torch.float32, None, 1e-5), (torch.float32, "int8", 1e-5),
                                                         (torch.bfloat16, None, 3e-2)], ids=["fp32", "int8", "bf16"])
def test_measured_and_forced_choices_give_the_static_logits(checkpoints, group, dtype, quantize, tolerance):
    model = load_model(checkpoints / "tiny", dtype=dtype, quantize=quantize, **RUNTIME)

    def logits():
        return [
            model(TOKENS, 0).logits,  # 14 rows in every weight
            model(TOKENS[:, :3], 0, last_only=True).logits,  # prefill: 6 rows, then 2 in the output
            model(TOKENS[:, 3:4], 3).logits,  # a decode step of 2 rows
            model(TOKENS[:1, 4:5], 4).logits,  # a decode step of 1 row
        ]

    choose_kernels(model, "static")
    static = logits()
    tables = [choose_kernels(model, "measure")] + list(_forced_tables(model, dtype))
    assert len(tables) >= 3
    for table in tables:
        install_kernel_table(table)
        for out, expected in zip(logits(), static):
            assert rel_diff(out, expected) < tolerance, table


def ranks_worker(ckpt: str, cache: str) -> dict:
    """Rank 1 would choose otherwise (its own fastest is the slowest): every rank must end with rank 0's table."""
    import os

    os.environ[CACHE_ENV] = cache
    context = init_distributed()
    writes = []
    real_write = kernel_choice.write_cache
    kernel_choice.write_cache = lambda *a: writes.append(1) or real_write(*a)
    if context.rank == 1:
        kernel_choice.fastest = lambda times, static: max(times, key=times.get)
    timed = []
    real_time = kernel_choice.time_candidates
    kernel_choice.time_candidates = lambda key, rows, weights: timed.append(key) or real_time(key, rows, weights)
    model = load_model(ckpt, **RUNTIME)
    first = choose_kernels(model, "measure")
    logits = model(TOKENS, 0).logits
    again = choose_kernels(model, "measure")
    return {"first": first, "again": again, "installed": installed_kernel_table(), "writes": len(writes),
            "timed": timed, "logits": logits, "threads": torch.get_num_threads()}


def test_ranks_agree_on_rank0s_choice(checkpoints, tmp_path):
    results = run_local(ranks_worker, 2, str(checkpoints / "tiny"), str(tmp_path / "cache"), timeout_s=120)
    zero, one = results
    assert zero["first"] and one["first"] == zero["first"] == one["again"] == zero["again"] == one["installed"]
    # Both ranks timed the same pairs at once (the first build), none at the second (rank 0 read its cache).
    assert one["timed"] == zero["timed"] and set(zero["timed"]) == set(zero["first"])
    assert (zero["writes"], one["writes"]) == (1, 0)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert torch.equal(zero["logits"], one["logits"])


def test_a_bad_kernel_choice_is_one_error_line(capsys):
    rc = cli.main(["generate", "--prompt", "one two", "--kernel_choice", "fastest"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "kernel_choice" in err and "fastest" in err
