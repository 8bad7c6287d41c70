"""init_distributed() under a real SLURM: plain `srun` (no torchrun) must give every task its rank and a
working process group. The cluster is the session fixture `slurm_cluster` (tests/slurm_cluster.py)."""

from __future__ import annotations

import re
import socket
import textwrap

from llama_dist.dist.launch_env import expand_slurm_nodelist, slurm_port

# Runs in every srun task. Prints one RESULT line per rank; double quotes only, the script quotes it in ''.
RANK_CODE = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from llama_dist.dist.groups import init_distributed, shutdown_distributed
    from llama_dist.dist.launch_env import read_launch_env
    launch = read_launch_env()
    ctx = init_distributed()
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    print(f"RESULT rank={ctx.rank} world={ctx.world_size} local={ctx.local_rank} value={t.item():g} "
          f"launcher={launch.launcher} addr={launch.master_addr} port={launch.master_port} backend={ctx.backend}",
          flush=True)
    shutdown_distributed()
    """
).strip()

RESULT_RE = re.compile(
    r"RESULT rank=(\d+) world=(\d+) local=(\d+) value=(\S+) launcher=(\S+) addr=(\S+) port=(\d+) backend=(\S+)"
)


def test_srun_two_tasks_all_reduce(slurm_cluster, tmp_path):
    script = tmp_path / "allreduce.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=1\n"
        "#SBATCH --ntasks-per-node=2\n"
        "#SBATCH --time=5\n"
        "set -eu\n"
        # --kill-on-bad-exit: if one rank dies the other must not wait for it until the collective timeout.
        f"srun --kill-on-bad-exit=1 python -c '{RANK_CODE}'\n"
    )
    # A short collective timeout so a broken rendezvous fails the job quickly instead of hanging.
    result = slurm_cluster.submit(script, env={"LLAMA_DIST_TIMEOUT": "60"}, timeout_s=150)
    assert result.returncode == 0, f"job {result.job_id} {result.state}:\n{result.output}"

    rows = {int(m.group(1)): m.groups() for m in RESULT_RE.finditer(result.output)}
    assert sorted(rows) == [0, 1], result.output
    expected_port = slurm_port(int(result.job_id), 0)  # what launch_env.slurm_port derives for the script's first step
    for rank, (_, world, local, value, launcher, addr, port, backend) in rows.items():
        assert (int(world), float(value)) == (2, 3.0), result.output
        assert int(local) == rank  # one node: SLURM_LOCALID equals SLURM_PROCID
        assert launcher == "slurm" and backend == "gloo"
        assert addr == socket.gethostname().split(".")[0]  # first host of SLURM_JOB_NODELIST
        assert int(port) == expected_port


def test_submit_reports_job_failure(slurm_cluster, tmp_path):
    # The harness must not turn a failing job into a pass.
    script = tmp_path / "fail.sbatch"
    script.write_text("#!/bin/bash\necho about to fail\nexit 3\n")
    rc, out = slurm_cluster.submit(script, timeout_s=60)
    assert rc == 3 and "about to fail" in out


def test_expand_slurm_nodelist():
    assert expand_slurm_nodelist("node[01-03,07],login1") == ["node01", "node02", "node03", "node07", "login1"]
    assert expand_slurm_nodelist("a1,b2") == ["a1", "b2"]
    assert expand_slurm_nodelist("gpu7") == ["gpu7"]
