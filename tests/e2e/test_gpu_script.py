"""`launch/run_on_gpu.sh --dry-run`: on a machine without a GPU (CI), the GPU run's plan is checked: the wheels it
needs are named, every command it would start resolves (module, subcommand, flags, random:NAME checkpoints), the GPU
tests collect. A few seconds."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _checker():
    spec = importlib.util.spec_from_file_location("check_gpu_run", REPO / "launch" / "check_gpu_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_names_the_wheels_and_resolves_every_command(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "WHEEL_DIR": str(tmp_path / "no_wheels"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "launch" / "run_on_gpu.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = proc.stdout
    # A clean clone carries no wheels: each one the GPU machine lacks is named.
    for wheel in ("fairscale", "fire", "termcolor", "fastapi", "uvicorn", "pydantic-core", "llguidance"):
        assert f"\n       {wheel}\n" in out
    checked = [line for line in out.splitlines() if line.startswith(("ok   $PYTHON", "ok   LLAMA_DIST_GPU_TESTS"))]
    assert len(checked) == 8 and "FAIL" not in out  # tests/gpu, both 1B runs, the four 8B runs, the server's
    assert any("random:Llama-3-8B" in line and "--quantize int4" in line for line in checked)
    assert "== dry run done (every check passed)" in out


def test_the_check_fails_on_a_command_that_would_not_run():
    check = _checker().check_command
    assert check("$PYTHON -m llama_dist.bench run --ckpt_dir random:tiny --batch_sizes 1") == []
    assert check("$PYTHON -m llama_dist.bench run --batch_size 1") == ["bench run: no flag --batch_size"]
    assert "Llama-9" in check("$PYTHON -m llama_dist.bench run --ckpt_dir random:Llama-9")[0]
    assert check("$PYTHON -m llama_dist.bench serve --ckpt_dir x --server_flags='--compile False' --nonesuch")[0] \
        == "bench serve: no flag --nonesuch"
    assert check("$PYTHON -m llama_dist.bench nope") and check("$PYTHON -m no_such_module")
    assert check("LLAMA_DIST_GPU_TESTS=1 $PYTHON -m pytest -q tests/no_such_dir")
