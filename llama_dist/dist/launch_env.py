"""Where this process sits in its job, as its launcher says: torchrun's variables, SLURM's (plain `srun`), or
none (a one-rank job). Malformed or inconsistent variables are named in a ConfigError before anything starts.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
from dataclasses import dataclass

from llama_dist.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job and where its ranks meet, as told by its launcher
    (`read_launch_env`)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list ("gpu[01-03,07],login1") into host names.

    `scontrol show hostnames` is authoritative but is not present on every compute image, so this parser
    handles the forms SLURM emits: comma-separated hosts, each with optional bracketed ranges.
    """
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


@functools.lru_cache(maxsize=8)  # read_launch_env runs often; scontrol once per node list is enough
def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return expand_slurm_nodelist(nodelist)[0]


def free_port() -> int:
    """A TCP port no process listens on, on any interface (so also on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# SLURM-derived rendezvous ports lie in [20000, 32768): user ports below Linux's ephemeral range (32768+).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 12768
# Spreads the steps of one job over the range (a prime, so coprime with the span: steps never share a port).
_STEP_STRIDE = 6007


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """The rendezvous port every task of SLURM step `job_id.step_id` derives alike, with no coordination.

    Consecutive job ids get consecutive ports, so the first steps of two jobs collide only when their ids differ
    by a multiple of the span (12768); concurrent steps of one job get different ports (a later step may meet
    another job's first step: job J step 1 derives what job J + 6007 step 0 does). A collision that still happens is detected at
    start-up (the port is busy, or its store belongs to another job) and reported as such.
    """
    return SLURM_PORT_BASE + (job_id + step_id * _STEP_STRIDE) % SLURM_PORT_SPAN


def _int_var(env: dict[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    """Launch variable `name` as an integer >= minimum (ConfigError naming it otherwise)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ConfigError(f"launch variable {name} is not set")
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"launch variable {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"launch variable {name} must be >= {minimum}, got {value}")
    return value


def _port_var(env: dict[str, str], name: str, default: int) -> int:
    port = _int_var(env, name, default, minimum=1)
    if port > 65535:
        raise ConfigError(f"launch variable {name} must be a TCP port (1-65535), got {port}")
    return port


def _checked_layout(rank: int, world_size: int, rank_var: str, world_var: str) -> None:
    if rank >= world_size:  # (world_size >= 1 was checked as it was read)
        raise ConfigError(f"launch variable {rank_var}={rank} is outside the world of {world_var}={world_size} ranks")


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Rank layout from torchrun's variables, else SLURM's (plain `srun`), else a one-rank job.

    Malformed or inconsistent variables (a non-integer, a rank outside the world, a world of 0, RANK without
    WORLD_SIZE) raise ConfigError naming the variable.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [name for name in ("RANK", "WORLD_SIZE") if name not in env]
        if missing:
            present = "WORLD_SIZE" if missing == ["RANK"] else "RANK"
            raise ConfigError(
                f"launch variable {present} is set but {missing[0]} is not: set both (torchrun does) or neither"
            )
        rank, world_size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE", minimum=1)
        _checked_layout(rank, world_size, "RANK", "WORLD_SIZE")
        return LaunchEnv(
            rank=rank,
            world_size=world_size,
            local_rank=_int_var(env, "LOCAL_RANK", 0),
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_port_var(env, "MASTER_PORT", 29500),
            launcher="torchrun",
        )
    # SLURM_STEP_ID marks a task started by srun; the batch script itself also has SLURM_PROCID=0 and the
    # job's task count, and must not mistake itself for rank 0 of a group nobody else will join.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        world_var = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
        rank, world_size = _int_var(env, "SLURM_PROCID"), _int_var(env, world_var, 1, minimum=1)
        _checked_layout(rank, world_size, "SLURM_PROCID", world_var)
        default_port = slurm_port(_int_var(env, "SLURM_JOB_ID", 0), _int_var(env, "SLURM_STEP_ID", 0))
        return LaunchEnv(
            rank=rank,
            world_size=world_size,
            local_rank=_int_var(env, "SLURM_LOCALID", 0),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            master_port=_port_var(env, "MASTER_PORT", default_port),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")


def local_world_size(launch: LaunchEnv | None = None) -> int:
    """How many ranks of this job run on this node (1 for a one-process run)."""
    launch = read_launch_env() if launch is None else launch
    if launch.launcher == "torchrun":
        return _int_var(dict(os.environ), "LOCAL_WORLD_SIZE", launch.world_size, minimum=1)
    if launch.launcher == "slurm":
        per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
        counts = _tasks_per_node(per_node)
        node = _int_var(dict(os.environ), "SLURM_NODEID", 0)
        return counts[node] if node < len(counts) else 1
    return 1


def _tasks_per_node(layout: str) -> list[int]:
    """SLURM's compressed tasks-per-node list, one count per node: "2(x3),1" is [2, 2, 2, 1]."""
    counts = []
    for part in layout.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts or [1]
