"""`python -m llama_dist.bench run` on the bundled tiny model: the kernel table, the machine limits and the per-batch
table's columns (the 1 GiB read-bandwidth and one-row-kernel measurements included: a few seconds); on random
weights drawn at load (random:tiny) with a single generated token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from llama_dist.cli import default_checkpoint
from llama_dist.model.kernels import KERNELS

REPO = Path(__file__).resolve().parents[2]


def test_run_prints_kernels_machine_limits_and_shares(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLAMA_DIST_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "llama_dist.bench", "run", "--ckpt_dir", str(default_checkpoint()),
                           "--batch_sizes", "1,2", "--prompt_len", "4", "--gen_len", "4", "--repeats", "1",
                           "--dtype", "float32"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    start = lines.index("| weight | out x in, dtype | rows 1 | rows 2 |")
    kernel_rows = [line.split("|")[1:-1] for line in lines[start + 2 : start + 7]]
    assert [cells[0].strip() for cells in kernel_rows] == ["wqkv", "wo", "w13", "w2", "output"]
    names = {name for kind in KERNELS.values() for name in kind}
    for cells in kernel_rows:
        assert re.fullmatch(r"\d+x\d+ float32", cells[1].strip())
        assert all(cell.strip().removesuffix(" (rule)") in names for cell in cells[2:])
    limits = next(line for line in lines if line.startswith("Machine limits"))
    assert re.search(r"read bandwidth [\d.]+ GB/s", limits) and re.search(r"one-row kernel [\d.]+ GB/s", limits)
    header = next(line for line in lines if line.startswith("| ranks | batch |"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    assert columns[6:10] == ["GB/s achieved", "of copy BW", "of read BW", "of 1-row kernel"]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 1 |")]
    assert [cells[1].strip() for cells in rows] == ["1", "2"]
    for cells in rows:
        assert all(re.fullmatch(r"\d+%", cells[i].strip()) for i in (7, 8, 9))


def test_run_on_random_weights_with_one_token_times_the_first_token_only(tmp_path):
    """gen_len 1 has no decode step: its decode figures are "-", not a division by zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLAMA_DIST_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "llama_dist.bench", "run", "--ckpt_dir", "random:tiny",
                           "--batch_sizes", "2", "--prompt_len", "4", "--gen_len", "1", "--repeats", "1",
                           "--dtype", "float32", "--nomachine_limits"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "random:tiny: 1 rank(s), float32" in proc.stdout
    cells = [c.strip() for c in next(line for line in proc.stdout.splitlines() if line.startswith("| 1 | 2 |"))
             .split("|")[1:-1]]
    assert float(cells[2]) > 0 and float(cells[3]) > 0  # time to first token, prefill tok/s
    assert cells[4:10] == ["-"] * 6  # decode tok/s, step ms, GB/s and its shares


def test_spec_prints_its_three_tables_with_outputs_equal_to_plain_decoding(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLAMA_DIST_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    tiny = str(default_checkpoint())
    proc = subprocess.run([sys.executable, "-m", "llama_dist.bench", "spec", "--ckpt_dir", tiny, "--text_ckpt", tiny,
                           "--dtype", "float32", "--repeats", "2", "--ks", "1,2", "--max_tokens", "16",
                           "--prompt_len", "8", "--ngram_min", "1"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for title in ("1. One verify step of k guesses", "3. A self-draft", "2. Prompt lookup on a copy-heavy task"):
        assert title in proc.stdout, proc.stdout
    assert [line.split("|")[1].strip() for line in proc.stdout.splitlines() if re.match(r"\| (decode|\d) \|", line)] \
        == ["decode", "1", "2"]
    speculative = [line for line in proc.stdout.splitlines() if line.startswith(("| int4 copy", "| prompt lookup"))]
    assert len(speculative) == 2 and all(line.rstrip(" |").endswith("yes") for line in speculative), proc.stdout
