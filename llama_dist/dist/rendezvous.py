"""The start-up rendezvous: where the ranks of a job first meet (torch's TCP store), with every wait bounded.

torch's own rendezvous can wait without limit (on a port held by a program that accepts connections and never
answers), prints C++ stack traces for a busy port, and cannot tell a concurrent job's store from its own. Here a
busy port, a foreign store, a silent or absent address and missing ranks each end start-up within the timeout with
a StartupError that says which.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
import threading
import time

import torch.distributed as dist

from llama_dist.dist.launch_env import LaunchEnv
from llama_dist.errors import StartupError, one_line


def format_host(host: str) -> str:
    """`host` as it goes before `:port` (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# Keys this package keeps in the rendezvous store, beside torch's own.
_OWNER_KEY = "llama_dist/job"
_ARRIVED_KEY = "llama_dist/arrived"


def _job_identity(launch: LaunchEnv) -> str:
    """What names this job to its peers, so a rank that reached another job's store can tell."""
    if launch.launcher == "slurm":
        return f"SLURM job {os.environ.get('SLURM_JOB_ID', '?')} step {os.environ.get('SLURM_STEP_ID', '?')}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun run {run_id}" if run_id else "a job started without a run id"


def _uses_agent_store() -> bool:
    """torchrun's agent hosts the store at MASTER_PORT and every worker, rank 0 included, is its client."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _check_port_free(launch: LaunchEnv, address: str) -> None:
    """Refuse a rendezvous port another process listens on, before the store tries to (its own error is a C++
    stack trace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is no owner
        try:
            probe.bind(("", launch.master_port))
        except OSError as exc:
            raise StartupError(f"rank 0 cannot host the rendezvous at {address}: {_port_owner_hint(launch, exc)}") from None


def _port_owner_hint(launch: LaunchEnv, exc: OSError | None = None) -> str:
    in_use = exc is None or exc.errno == errno.EADDRINUSE
    reason = "the port is already in use by another job or program" if in_use else str(exc)
    derived = launch.launcher == "slurm" and "MASTER_PORT" not in os.environ
    derived = " (derived from SLURM_JOB_ID and SLURM_STEP_ID)" if derived else ""
    return f"{reason}{derived}; set MASTER_PORT to a free port"


def _describe_silence(launch: LaunchEnv, address: str, timeout_s: float) -> str:
    """Why the store at `address` did not answer within the timeout, from one quick connection attempt."""
    try:
        with socket.create_connection((launch.master_addr, launch.master_port), timeout=1.0):
            what = "something listens there but does not answer as a rendezvous store: the port is held by another program"
    except ConnectionRefusedError:
        what = "nothing listens there: rank 0 has not started, or MASTER_ADDR/MASTER_PORT point elsewhere"
    except OSError as exc:
        what = f"it cannot be reached ({exc})"
    return (
        f"rank {launch.rank} could not join the rendezvous at {address} within the {timeout_s:g} s timeout: {what}"
    )


def _wait_until_listening(launch: LaunchEnv, address: str, timeout_s: float, deadline: float) -> None:
    """Wait (up to the deadline) until something accepts connections at the rendezvous address, before the store
    connects: its own retries print a C++ warning for every refused attempt."""
    while True:
        try:
            with socket.create_connection((launch.master_addr, launch.master_port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise StartupError(_describe_silence(launch, address, timeout_s)) from None
            time.sleep(0.1)


def meet_at_rendezvous(launch: LaunchEnv, timeout_s: float) -> dist.Store:
    """The TCP store of this job's rendezvous, once every rank has reached it; every wait bounded by `timeout_s`.

    Rank 0 hosts the store (unless torchrun's agent does), after checking its port is free. Each rank then checks
    the store belongs to this job (a port shared with a concurrent job would otherwise mix the two) and waits for
    the other ranks. A busy port, a foreign store, a silent address or missing ranks raise StartupError on the
    rank that saw it, within the timeout: torch's store would wait without limit on a port held by a program
    that accepts connections and never answers.
    """
    address = f"{format_host(launch.master_addr)}:{launch.master_port}"
    hosting = launch.rank == 0 and not _uses_agent_store()
    if hosting:
        _check_port_free(launch, address)
    deadline = time.monotonic() + timeout_s
    outcome: dict = {}

    def connect_and_register() -> None:
        try:
            outcome["store"] = _connect_and_register(launch, address, hosting, timeout_s, deadline)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    # The store's own connection can block without limit (it waits for an answer the port's holder never
    # gives), so it runs on a thread this one stops waiting for at the deadline; the process then ends.
    worker = threading.Thread(target=connect_and_register, name="llama-dist-rendezvous", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()) + 0.5)
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, StartupError):
            raise error
        first_line = one_line(error, first=True)
        if hosting:
            raise StartupError(f"rank 0 cannot host the rendezvous at {address}: {first_line}") from None
        raise StartupError(f"{_describe_silence(launch, address, timeout_s)} ({first_line})") from None
    if "store" not in outcome:
        raise StartupError(_describe_silence(launch, address, timeout_s))
    return outcome["store"]


def _connect_and_register(launch: LaunchEnv, address: str, hosting: bool, timeout_s: float, deadline: float):
    if not hosting:
        _wait_until_listening(launch, address, timeout_s, deadline)
    store = dist.TCPStore(
        launch.master_addr, launch.master_port, launch.world_size, hosting,
        timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
    )
    if _uses_agent_store():  # torchrun's layout: each restart of the job gets its own key space
        store = dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)

    def wait_until(ready, what) -> None:
        while not ready():
            if time.monotonic() > deadline:
                raise StartupError(f"rank {launch.rank}: {what()} within the {timeout_s:g} s timeout (at {address})")
            time.sleep(0.02)

    identity = _job_identity(launch)
    if launch.rank == 0:
        store.set(_OWNER_KEY, identity)
    else:
        wait_until(lambda: store.check([_OWNER_KEY]), lambda: "rank 0 of this job did not register at the rendezvous")
        owner = store.get(_OWNER_KEY).decode(errors="replace")
        if owner != identity:
            raise StartupError(
                f"the rendezvous at {address} belongs to another job ({owner}), not to this one ({identity}): "
                f"{_port_owner_hint(launch)}"
            )
    store.add(_ARRIVED_KEY, 1)
    wait_until(
        lambda: store.add(_ARRIVED_KEY, 0) >= launch.world_size,
        lambda: f"only {store.add(_ARRIVED_KEY, 0)} of {launch.world_size} ranks reached the rendezvous",
    )
    return store
