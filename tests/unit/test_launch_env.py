"""Launcher environments: torchrun's and SLURM's variables read into a rank layout, malformed ones named."""

import pytest

from llama_dist.dist.launch_env import (
    SLURM_PORT_SPAN,
    LaunchEnv,
    expand_slurm_nodelist,
    local_world_size,
    read_launch_env,
    slurm_port,
)
from llama_dist.errors import ConfigError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29511"}
SLURM = {  # what srun gives task 5 of a 6-task step on nodes node03..node05
    "SLURM_PROCID": "5",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "6",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "node[03-05]",
}


def test_torchrun_env():
    assert read_launch_env(TORCHRUN) == LaunchEnv(3, 8, 1, "10.1.2.3", 29511, "torchrun")


def test_torchrun_env_defaults():
    assert read_launch_env({"RANK": "0", "WORLD_SIZE": "2"}) == LaunchEnv(0, 2, 0, "127.0.0.1", 29500, "torchrun")


def test_slurm_env():
    # The first host of the allocation is the master; the port is derived from the job and step ids.
    assert read_launch_env(SLURM) == LaunchEnv(5, 6, 1, "node03", 20000 + 123456 % 12768, "slurm")


def test_slurm_port_is_shared_by_a_job_and_differs_between_jobs():
    def port(job, task):
        return read_launch_env({**SLURM, "SLURM_JOB_ID": job, "SLURM_PROCID": str(task)}).master_port

    for job in ("7", "8", "99999"):
        assert len({port(job, task) for task in range(6)}) == 1  # every task agrees without talking
        assert 1024 < port(job, 0) < 32768  # a user port below Linux's ephemeral range
    assert len({port(job, 0) for job in ("7", "8", "99999")}) == 3


def test_slurm_ports_of_concurrent_jobs_and_steps_differ():
    def port(job, step=0):
        env = {**SLURM, "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step), "MASTER_ADDR": "node03"}
        return read_launch_env(env).master_port

    # Job ids 10000 apart shared one port by construction before; steps of one job shared it too.
    assert port(123456) != port(133456)
    assert port(123456, 0) != port(123456, 1)
    # Jobs submitted around the same time (ids within the span of the port range) never share a port, and
    # concurrent steps of one job (`srun ... &` twice) get different ports.
    jobs = range(500000, 500000 + SLURM_PORT_SPAN)
    assert len({slurm_port(job) for job in jobs}) == len(jobs)
    assert len({slurm_port(123456, step) for step in range(64)}) == 64
    assert all(20000 <= slurm_port(job, step) < 32768 for job in (0, 1, 99999, 4294967295) for step in (0, 1, 7))


@pytest.mark.parametrize(
    "env, parts",
    [
        ({"RANK": "one", "WORLD_SIZE": "2"}, ["RANK must be an integer", "'one'"]),
        ({"RANK": "0", "WORLD_SIZE": "2.5"}, ["WORLD_SIZE must be an integer", "'2.5'"]),
        ({"RANK": "2", "WORLD_SIZE": "2"}, ["RANK=2 is outside the world of WORLD_SIZE=2"]),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, ["RANK must be >= 0", "-1"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE must be >= 1", "0"]),
        ({"RANK": "1"}, ["RANK is set but WORLD_SIZE is not"]),
        ({"WORLD_SIZE": "2"}, ["WORLD_SIZE is set but RANK is not"]),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "http"}, ["MASTER_PORT must be an integer"]),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, ["MASTER_PORT must be a TCP port", "70000"]),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"}, ["LOCAL_RANK must be an integer"]),
        ({**SLURM, "SLURM_PROCID": "five"}, ["SLURM_PROCID must be an integer", "'five'"]),
        ({**SLURM, "SLURM_PROCID": "6"}, ["SLURM_PROCID=6 is outside the world of SLURM_NTASKS=6"]),
        ({**SLURM, "SLURM_NTASKS": "0"}, ["SLURM_NTASKS must be >= 1"]),
        ({**SLURM, "SLURM_STEP_NUM_TASKS": "2"}, ["SLURM_PROCID=5 is outside the world of SLURM_STEP_NUM_TASKS=2"]),
        ({**SLURM, "SLURM_JOB_ID": "12a"}, ["SLURM_JOB_ID must be an integer"]),
        ({**SLURM, "SLURM_LOCALID": ""}, []),  # empty: the default, as SLURM leaves some variables
    ],
)
def test_malformed_launch_variables_are_one_named_config_error(env, parts):
    if not parts:
        assert read_launch_env(env).local_rank == 0
        return
    with pytest.raises(ConfigError, match="launch variable") as info:
        read_launch_env(env)
    assert all(part in str(info.value) for part in parts), str(info.value)


def test_slurm_step_variables_and_explicit_master():
    env = {**SLURM, "SLURM_STEP_NODELIST": "gpu[7-9],login1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"}
    launch = read_launch_env(env)
    assert (launch.master_addr, launch.world_size) == ("gpu7", 4)  # the step's nodes and tasks, not the job's
    env.update(MASTER_ADDR="head.example", MASTER_PORT="40000")
    launch = read_launch_env(env)
    assert (launch.master_addr, launch.master_port) == ("head.example", 40000)


def test_sbatch_script_outside_srun_is_a_single_rank():
    batch_env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"}
    assert read_launch_env(batch_env).launcher == "single"


def test_no_launcher_is_a_single_rank():
    assert read_launch_env({}) == LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")
    assert read_launch_env({"SLURM_PROCID": "1"}).launcher == "single"


def test_torchrun_wins_over_slurm():
    # torchrun inside an sbatch allocation: SLURM describes the allocation, torchrun the ranks.
    assert read_launch_env({**SLURM, **TORCHRUN}) == LaunchEnv(3, 8, 1, "10.1.2.3", 29511, "torchrun")


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node[03-05]", ["node03", "node04", "node05"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("cn-1,cn-2", ["cn-1", "cn-2"]),
        ("rack1-node[1,3],rack2-node[2-3]", ["rack1-node1", "rack1-node3", "rack2-node2", "rack2-node3"]),
        ("10.0.0.5", ["10.0.0.5"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "layout, node, ranks",
    [("4", "0", 4), ("2(x3)", "2", 2), ("2(x3),1", "3", 1), ("3,1", "0", 3), ("3,1", "1", 1), ("2(x2)", None, 2)],
)
def test_ranks_on_this_node_under_srun(monkeypatch, layout, node, ranks):
    """SLURM's tasks-per-node list read for this node (SLURM_NODEID), not the first node's count for all."""
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", layout)
    if node is None:
        monkeypatch.delenv("SLURM_NODEID", raising=False)
    else:
        monkeypatch.setenv("SLURM_NODEID", node)
    assert local_world_size(read_launch_env(SLURM)) == ranks
