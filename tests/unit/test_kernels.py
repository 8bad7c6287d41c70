"""The matmul kernels of `model.kernels` and the pieces of the measured choice (`model.kernel_choice`) that need no
model: every candidate's result, the dispatch through an installed table, row buckets, the cache file."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import raises_naming, rel_diff

from llama_dist.config import CACHE_ENV
from llama_dist.errors import ConfigError
from llama_dist.model import kernel_choice, kernels
from llama_dist.model.kernels import (
    KERNELS,
    ROW_BUCKETS,
    install_kernel_table,
    local_linear,
    row_bucket,
    weight_key,
)
from llama_dist.model.quant import Int4Weight, Int8Weight

OUT, IN = 96, 160  # out: a multiple of 16 (the packed int4 layout); in: five groups of 32
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _weight(kind: str, dtype: torch.dtype):
    """(the weight as local_linear takes it, its exact float64 value)."""
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1)) * IN**-0.5
    if kind == "dense":
        w = w.to(dtype)
        return w, w.double()
    if kind == "int8":
        q = Int8Weight.quantize(w, dtype)
        return q, q.qweight.double() * q.scale.double()[:, None]
    q = Int4Weight.quantize(w, 32, dtype, packed=kind == "int4")
    values = q.unpacked_values().double().view(OUT, -1, 32)
    scale, zero = q.scales_and_zeros.double().transpose(0, 1).unbind(-1)
    return q, ((values - 8) * scale[..., None] + zero[..., None]).view(OUT, -1)[:, :IN]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(KERNELS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 11), (2, 150)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_candidate_matches_float64(kind, dtype, shape):
    weight, exact = _weight(kind, dtype)
    x = torch.randn(*shape, IN, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = x.double() @ exact.t()
    rows = shape[0] * shape[1]
    names = [n for n in KERNELS[kind] if rows == 1 or n not in ("mv", "mv_dequantized")]
    assert set(kernels.candidates(kind, dtype, rows)) <= set(names)
    for name in names:
        out = kernels.run_kernel(name, x, weight)
        assert out.shape == (*shape, OUT) and out.dtype == dtype, name
        assert rel_diff(out, expected) < TOLERANCE[dtype], name


def test_local_linear_runs_the_installed_choice_else_the_static_rule(monkeypatch):
    weight = torch.randn(OUT, IN)
    x = torch.randn(1, 5, IN)
    called = []
    for name in ("linear", "matmul_t"):
        real = KERNELS["dense"][name]
        monkeypatch.setitem(KERNELS["dense"], name, lambda x, w, rows, name=name, real=real: called.append(name)
                            or real(x, w, rows))
    try:
        assert kernels.static_kernel(weight, x.device, x.dtype, 5) == "matmul_t"
        local_linear(x, weight)
        install_kernel_table({(*weight_key(weight, torch.float32), row_bucket(5)): "linear"})
        local_linear(x, weight)
        local_linear(x[:, :1], weight)  # another bucket, not in the table: the static rule's mv
        local_linear(x.double(), weight.double())  # another dtype, not in the table: the static rule's matmul_t
    finally:
        install_kernel_table({})
    assert called == ["matmul_t", "linear", "matmul_t"]


def test_row_buckets_cover_every_row_count_once():
    firsts = [first for first, _ in ROW_BUCKETS]
    assert firsts == sorted(firsts) and firsts[0] == 1
    for rows in range(1, 700):
        bucket = row_bucket(rows)
        assert firsts[bucket] <= rows and (bucket + 1 == len(firsts) or rows < firsts[bucket + 1])
    for bucket, (first, timed) in enumerate(ROW_BUCKETS):
        assert row_bucket(timed) == bucket


def test_resolve_mode(monkeypatch):
    monkeypatch.delenv(kernel_choice.MODE_ENV, raising=False)
    assert kernel_choice.resolve_mode(None) == "measure"
    monkeypatch.setenv(kernel_choice.MODE_ENV, "static")
    assert kernel_choice.resolve_mode(None) == "static"
    assert kernel_choice.resolve_mode("measure") == "measure"
    with raises_naming(ConfigError, "kernel_choice", "fastest"):
        kernel_choice.resolve_mode("fastest")


def test_the_static_rule_wins_ties():
    assert kernel_choice.fastest({"mv": 1.0, "linear": 0.99}, "mv") == "mv"
    assert kernel_choice.fastest({"mv": 1.0, "linear": 0.5}, "mv") == "linear"


TABLE = {
    ("dense", 512, 128, torch.bfloat16, 0): "linear",
    ("int8", 704, 128, torch.float32, 3): "dequantized",
    ("int4", 256, 128, torch.bfloat16, 32, 1): "int4pack",
}


def test_cache_round_trip_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    identity = {"version": 1, "cpu": "Some CPU", "torch": "2.0", "threads": 2, "ranks": 1}
    path = kernel_choice.cache_path(identity)
    assert path.parent == tmp_path / "cache" and path.name.startswith("kernels-")
    kernel_choice.write_cache(path, identity, TABLE)
    assert kernel_choice.read_cache(path, identity) == TABLE
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    for field, value in [("cpu", "Other CPU"), ("torch", "2.1"), ("threads", 4), ("ranks", 2)]:
        other = {**identity, field: value}
        assert kernel_choice.cache_path(other) != path
        assert kernel_choice.read_cache(path, other) == {}  # a file of another key is not this key's


@pytest.mark.parametrize("text", ["", "{not json", "[]", json.dumps({"identity": {}, "kernels": 3}),
                                  "BAD_KERNEL", "BAD_DTYPE"])
def test_a_corrupt_cache_is_ignored(tmp_path, text):
    identity = {"cpu": "x"}
    path = tmp_path / "kernels-x.json"
    if text == "BAD_KERNEL":
        text = json.dumps({"identity": identity, "kernels": [["dense", 4, 4, "float32", 0, "rm -rf"]]})
    if text == "BAD_DTYPE":
        text = json.dumps({"identity": identity, "kernels": [["dense", 4, 4, "__class__", 0, "mv"]]})
    path.write_text(text)
    assert kernel_choice.read_cache(path, identity) == {}
    assert kernel_choice.read_cache(tmp_path / "missing.json", identity) == {}
