"""The launch paths users meet first, run for real on the bundled tiny model.

Single process, `launch/run_local.sh` (torchrun, 2 ranks), two torchrun agents on localhost acting as two
nodes (c10d rendezvous), and the SLURM batch scripts (generate, serve) submitted to a real one-node SLURM cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_dist.dist.launch_env import free_port

REPO = Path(__file__).resolve().parents[2]
PROMPT = "one two three four"
EXPECTED = "five six seven"
GENERATE = ["generate", "--prompt", PROMPT, "--temperature", "0", "--max_gen_len", "8"]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", **extra)
    return env


def _run(cmd: list[str], timeout_s: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout_s)


def _completions(output: str) -> list[str]:
    """Lines printed after the '> prompt' line: rank 0's completions only."""
    lines = output.splitlines()
    return [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == f"> {PROMPT}"]


def test_single_process():
    result = _run([sys.executable, "-m", "llama_dist", *GENERATE])
    assert result.returncode == 0, result.stderr
    assert len(_completions(result.stdout)) == 1
    assert _completions(result.stdout)[0].strip().startswith(EXPECTED)
    assert "on 1 rank(s)" in result.stdout


def test_run_local_script_two_ranks():
    result = _run(["bash", "launch/run_local.sh", *GENERATE], NPROC="2")
    assert result.returncode == 0, result.stderr
    completions = _completions(result.stdout)
    assert len(completions) == 1, result.stdout  # only rank 0 prints
    assert completions[0].strip().startswith(EXPECTED)
    assert "on 2 rank(s)" in result.stdout


def test_two_torchrun_agents_as_two_nodes():
    """Two agents rendezvous over c10d on 127.0.0.1 as two 'nodes' of one rank each."""
    env = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RDZV_ID="t2n")
    agents = [
        subprocess.Popen(
            ["bash", "launch/torchrun_multinode.sh", *GENERATE],
            cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=180)
            outputs.append((agent.returncode, out, err))
    finally:
        for agent in agents:
            agent.kill()
    for rc, _, err in outputs:
        assert rc == 0, err
    completions = [c for _, out, _ in outputs for c in _completions(out)]
    assert len(completions) == 1  # rank 0 sits on one of the two agents; only it prints
    assert completions[0].strip().startswith(EXPECTED)
    assert any("on 2 rank(s)" in out for _, out, _ in outputs)


@pytest.mark.parametrize("script", ["launch/slurm_torchrun.sbatch", "launch/slurm_srun.sbatch"])
def test_sbatch_scripts_on_real_slurm(slurm_cluster, script):
    sbatch_args = ["--nodes=1", "--ntasks-per-node=1"] if "torchrun" in script else ["--nodes=1", "--ntasks-per-node=2"]
    env = {"NPROC_PER_NODE": "2"} if "torchrun" in script else {}
    rc, out = slurm_cluster.submit(REPO / script, args=GENERATE, env=env, timeout_s=240, sbatch_args=sbatch_args)
    assert rc == 0, out
    completions = _completions(out)
    assert len(completions) == 1, out
    assert completions[0].strip().startswith(EXPECTED)
    assert "on 2 rank(s)" in out
    print(out)


def _wait_for(condition, timeout_s: float, what: str):
    """condition()'s first truthy value, polled until `timeout_s` (then AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.5)
    return value


def test_serve_sbatch_on_real_slurm(slurm_cluster):
    """launch/serve.sbatch with 2 tasks answers /v1/completions from rank 0 until scancel ends the job."""
    httpx = pytest.importorskip("httpx")
    port = free_port()
    env = {"PORT": str(port), "OMP_NUM_THREADS": "1", "LLAMA_DIST_TIMEOUT": "120"}  # HOST: 127.0.0.1 by default
    job_id, out_file = slurm_cluster.start_job(REPO / "launch/serve.sbatch", env=env,
                                               args=["--dtype", "float32", "--max_seq_len", "64"],
                                               sbatch_args=["--nodes=1", "--ntasks-per-node=2"])
    running = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")

    def output() -> str:
        return out_file.read_text(errors="replace") if out_file.exists() else ""

    def serving() -> bool:
        assert slurm_cluster.job_state(job_id) in running, f"the job ended early:\n{output()}"
        return "Serving " in output()

    try:
        _wait_for(serving, 180, "'Serving' line from rank 0")
        assert f"2 rank(s), URL http://127.0.0.1:{port}/v1 on {slurm_cluster.hostname}" in output()
        assert f"ssh -L {port}:127.0.0.1:{port} {slurm_cluster.hostname}" in output()
        assert "(2 rank(s)" in output()
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"].strip().startswith(EXPECTED)
    finally:
        slurm_cluster.cancel(job_id)
    _wait_for(lambda: slurm_cluster.job_state(job_id) not in running, 60, "end of the job after scancel")
    leftover = subprocess.run(["pgrep", "-f", f"llama_dist serve --host 127.0.0.1 --port {port}"],
                              capture_output=True, text=True).stdout.split()
    assert leftover == [], output()
    assert "Server stopped" in output()  # rank 0 took scancel's SIGTERM as an orderly shutdown
    print(output())
