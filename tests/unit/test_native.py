"""The compiled int8 kernel (`model/native.py`, `model/csrc/int8_rows.cpp`): built once and then loaded from its
cache, rebuilt when its source, torch or the CPU changes, and, where it cannot be built or is turned off, absent
from the candidates with one line saying why while int8 weights keep their library kernels. Its results against
float64 are in test_kernels.py (every candidate of every weight kind)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO, cli_env, rel_diff

from llama_dist.model import kernels, native
from llama_dist.model.kernels import install_kernel_table, installed_kernel_table, weight_key
from llama_dist.model.quant import Int8Weight

# A fresh process: reports whether the kernel is there, the int8 candidates for one row, and a product's error.
PROBE = """
import torch
from llama_dist.model import kernels, native
from llama_dist.model.quant import Int8Weight
ok = native.int8_rows_available()
w = Int8Weight.quantize(torch.randn(64, 200, generator=torch.Generator().manual_seed(0)), torch.float32)
x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
exact = x.double() @ w.dequantize().double().t()
out = kernels.local_linear(x, w)
print("RESULT", ok, ",".join(kernels.candidates("int8", torch.float32, 1)), float((out.double() - exact).abs().max()))
"""


# Where there is no C++ compiler the kernel cannot be built (the runtime says so and goes on without it); where
# there is one, it must build.
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                    reason="no C++ compiler: the compiled kernel cannot be built here")


def _probe(env_changes: dict[str, str]) -> tuple[bool, list[str], float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_changes}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1, done.stdout
    _, ok, names, error = result[0].split(" ")
    other = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("RESULT "))
    return ok == "True", names.split(","), float(error), other + done.stderr


@needs_compiler
def test_built_once_then_loaded_from_its_cache(tmp_path):
    env = {native.DIR_ENV: str(tmp_path / "native")}
    ok, names, error, output = _probe(env)
    assert ok and "native" in names and error < 1e-4
    assert output.count("Building the int8 one-row kernel") == 1, output
    built = list((tmp_path / "native").glob("*/*.so"))
    assert len(built) == 1 and built[0].parent.name == native.build_key(native.SOURCES / "int8_rows.cpp")
    assert not [p for p in (tmp_path / "native").rglob("*") if p.name.startswith(".build-")]  # no leftovers
    ok, names, error, output = _probe(env)
    assert ok and "native" in names and "Building" not in output


# Builds the kernel for an older instruction set (AVX2 without AVX-512, or plain x86-64: its portable loop) in a
# fresh process (a process loads one build only) and checks its products against float64.
OTHER_ISA = """
import sys, torch
from pathlib import Path
from llama_dist.model import native
native.build_and_load(native.SOURCES / "int8_rows.cpp", Path(sys.argv[2]), march=sys.argv[1])
worst = 0.0
for in_features in (48, 100, 2048):
    for rows in (1, 3, 6):
        q = torch.randint(-127, 128, (37, in_features), dtype=torch.int8, generator=torch.Generator().manual_seed(rows))
        scale = torch.rand(37, generator=torch.Generator().manual_seed(7))
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(in_features))
        exact = (x.double() @ q.double().t()) * scale.double()
        out = torch.ops.llama_dist.int8_rows(x, q, scale)
        worst = max(worst, float((out.double() - exact).abs().max() / exact.abs().max()))
print("WORST", worst)
"""


@needs_compiler
@pytest.mark.parametrize("march, flags", [("haswell", {"avx2", "fma"}), ("x86-64", set())], ids=["avx2", "portable"])
def test_older_instruction_sets_give_the_same_products(tmp_path, march, flags):
    cpu_flags = set(native.cpu_info().get("flags", "").split())
    if "sse2" not in cpu_flags or not flags <= cpu_flags:
        pytest.skip(f"this CPU cannot run code built for {march}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", OTHER_ISA, march, str(tmp_path / "k.so")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    worst = float(done.stdout.split("WORST ")[1])
    assert worst < 1e-5


@needs_compiler
def test_two_ranks_build_it_at_once_and_generate_what_the_library_kernels_do(tmp_path):
    """The first int8 start of a 2-rank job on a machine: both ranks build at once, rank 0 says so once, and the
    measured choice (the compiled kernel where it wins) generates the static rule's greedy text."""
    def generate(kernel_choice: str) -> subprocess.CompletedProcess:
        env = {**cli_env(), native.DIR_ENV: str(tmp_path / "native"), "LLAMA_DIST_CACHE": str(tmp_path / "cache"),
               "LLAMA_DIST_KERNEL_CHOICE": kernel_choice}
        argv = [sys.executable, "-m", "llama_dist.torchrun", "--standalone", "--nproc_per_node", "2", "-m",
                "llama_dist", "generate", "--quantize", "int8", "--prompt", "one two three", "--max_gen_len", "8",
                "--temperature", "0"]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)

    static = generate("static")
    assert static.returncode == 0, static.stderr
    assert not (tmp_path / "native").exists()  # the static rule needs no compiler
    measured = generate("measure")
    assert measured.returncode == 0, measured.stderr
    assert measured.stdout.count("Building the int8 one-row kernel") == 1, measured.stdout
    assert len(list((tmp_path / "native").glob("*/*.so"))) == 1
    text = [line for line in static.stdout.splitlines() if "one two three" in line]
    assert text and text == [line for line in measured.stdout.splitlines() if "one two three" in line]


def test_torch_compile_traces_it_as_one_call():
    if not native.int8_rows_available():
        pytest.skip("the compiled kernel could not be built here")
    weight = Int8Weight.quantize(torch.randn(48, 128, generator=torch.Generator().manual_seed(5)), torch.bfloat16)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    compiled = torch.compile(lambda v: kernels.run_kernel("native", v, weight) * 2, fullgraph=True)
    assert torch.equal(compiled(x), kernels.run_kernel("native", x, weight) * 2)


def test_no_compiler_leaves_the_library_kernels_with_one_line(tmp_path):
    ok, names, error, output = _probe({native.DIR_ENV: str(tmp_path / "native"), "CXX": str(tmp_path / "no-cc")})
    assert not ok and "native" not in names and names and error < 1e-4
    lines = [line for line in output.splitlines() if "not available" in line]
    assert len(lines) == 1 and "library kernels" in lines[0], output
    assert "Traceback" not in output


def test_turned_off_by_the_environment(tmp_path):
    ok, names, _, output = _probe({native.DIR_ENV: str(tmp_path / "native"), native.ENABLE_ENV: "0"})
    assert not ok and "native" not in names and "Building" not in output
    assert not (tmp_path / "native").exists()


def test_the_build_key_follows_source_torch_and_cpu(tmp_path, monkeypatch):
    source = tmp_path / "k.cpp"
    source.write_text("int f() { return 1; }\n")
    key = native.build_key(source)
    assert native.build_key(source) == key
    source.write_text("int f() { return 2; }\n")
    assert native.build_key(source) != key
    source.write_text("int f() { return 1; }\n")
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert native.build_key(source) != key
    monkeypatch.undo()
    monkeypatch.setattr(native, "_cpu_identity", lambda: "model name: Another CPU\nflags: sse2")
    assert native.build_key(source) != key


def test_a_choice_this_rank_cannot_run_is_left_to_the_static_rule(monkeypatch):
    weight = Int8Weight.quantize(torch.randn(32, 64), torch.float32)
    key = (*weight_key(weight, torch.float32), 0)
    monkeypatch.setattr(native, "int8_rows_available", lambda: False)
    try:
        install_kernel_table({key: "native", (*key[:-1], 1): "dequantized"})
        assert installed_kernel_table() == {(*key[:-1], 1): "dequantized"}
        x = torch.randn(1, 64)
        assert rel_diff(kernels.local_linear(x, weight), x @ weight.dequantize().t()) < 1e-5
    finally:
        install_kernel_table({})


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_activation_and_scale_dtypes(dtype):
    assert native.int8_rows_available()
    weight = torch.randn(70, 130, generator=torch.Generator().manual_seed(3))
    x = torch.randn(6, 130, generator=torch.Generator().manual_seed(4)).to(dtype)
    for scale_dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = Int8Weight.quantize(weight, scale_dtype)
        out = torch.ops.llama_dist.int8_rows(x, q.qweight, q.scale)
        exact = x.double() @ (q.qweight.double() * q.scale.double()[:, None]).t()
        assert out.dtype == dtype and out.shape == (6, 70)
        assert rel_diff(out, exact) < (1e-5 if dtype == torch.float32 else 1e-2), scale_dtype
