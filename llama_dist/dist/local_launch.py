"""Run a function on N local ranks without torchrun: for tests, notebooks and quick experiments.

Each rank is a fresh (spawned) Python process with torchrun-style RANK/WORLD_SIZE/MASTER_* variables, so the
function sees exactly what it would see under torchrun and calls `init_distributed()` itself. Results come
back to the caller in rank order; a rank that raises, dies or outlives `timeout_s` fails the whole run
(the other ranks are killed, never left waiting in a collective).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable

from llama_dist.dist.launch_env import free_port


class RankFailure(RuntimeError):
    """One or more local ranks raised, crashed or timed out."""


def _rank_main(fn, rank, world_size, port, env, args, kwargs, results):
    for name in [n for n in os.environ if n.startswith("TORCHELASTIC_")]:
        del os.environ[name]  # started from a torchrun worker: these ranks meet on their own store, not the agent's
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        # Plain pickle bytes: torch would otherwise pass tensors as shared-memory handles that die with this process.
        results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException as exc:  # noqa: BLE001 - report anything, including SystemExit, to the parent
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` spawned ranks and return their results in rank order.

    `fn` must be importable by name (a module-level function) and its result picklable.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, dict(env or {}), args, kwargs, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise RankFailure(f"ranks {missing} did not finish within {timeout_s:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
                outcomes[rank] = (ok, value)
                if not ok:
                    break  # the others may be blocked in a collective with the failed rank: stop them now
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in outcomes and not p.is_alive()]
            if dead:
                # A rank can die without a report (killed, segfault); give a late report a moment to land.
                time.sleep(0.5)
                while not results.empty():
                    rank, ok, value = results.get()
                    outcomes[rank] = (ok, value)
                dead = [r for r in dead if r not in outcomes]
                if dead:
                    codes = {r: procs[r].exitcode for r in dead}
                    raise RankFailure(f"ranks exited without a result (exit codes {codes})")
    finally:
        failed = any(not ok for ok, _ in outcomes.values()) or len(outcomes) < world_size
        for p in procs:
            p.join(timeout=0.1 if failed else 5)
            if p.is_alive():
                p.kill()
                p.join()
    failures = {r: v for r, (ok, v) in outcomes.items() if not ok}
    if failures:
        first = min(failures)
        raise RankFailure(f"{len(failures)} rank(s) failed; rank {first}:\n{failures[first]}")
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
