"""Process-group bootstrap: torchrun, plain srun, or a single process, on NCCL or gloo.

A process starts its group once, with `init_distributed()`: it reads the launcher's environment, starts the
default process group and fairscale's model-parallel group, binds the device and returns a `DistContext`
describing this rank, which is then handed to whatever needs it (`Llama.build(context=...)`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import io
import json
import math
import os
import pickle
import socket
import time
from dataclasses import dataclass

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig

from llama_dist.dist.launch_env import LaunchEnv, local_world_size, read_launch_env
from llama_dist.dist.rendezvous import meet_at_rendezvous
from llama_dist.dist.shm_allreduce import SharedMemoryAllReduce, create_for_group
from llama_dist.errors import ConfigError

# How long a rank waits in a collective (or the start-up rendezvous) for its peers before it fails. Generous
# enough for loading a 405B checkpoint from slow disks, short enough that a dead or stalled rank ends the job.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "LLAMA_DIST_TIMEOUT"


# Set up by init_distributed for CPU ranks on one host (LLAMA_DIST_SHM_ALLREDUCE=0 turns it off).
_shm_allreduce: SharedMemoryAllReduce | None = None
# (default group, device) of the group init_distributed started: joining it without a device returns that device (a
# gloo group may have been started for a GPU, and the group itself does not record that).
_started_on: tuple[object, torch.device] | None = None


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# One group for both kinds of tensor on GPUs: object collectives and CPU tensors (the benchmark's floats, a model
# loaded on the CPU) over gloo, CUDA tensors over NCCL. NCCL alone fails on the first CPU tensor.
NCCL_WITH_GLOO = "cpu:gloo,cuda:nccl"


def _carriers(backend: str) -> dict[str, str]:
    """Which backend carries each device type's tensors: "gloo" -> {"cpu": "gloo", "cuda": "gloo"}."""
    return dict(BackendConfig(Backend(backend)).get_device_backend_map())


def describe_backend(backend: str) -> str:
    """A backend (or torch's "device:backend,..." form) as people name it: "nccl+gloo", "gloo", "nccl"."""
    names = sorted(set(_carriers(backend).values()), key=lambda name: (name != "nccl", name))
    return "+".join(names)


def cuda_collectives_backend() -> str | None:
    """The backend that carries the model-parallel group's collectives on CUDA tensors ("nccl", "gloo"), or None
    when no group is started (one process: no collectives)."""
    if not dist.is_initialized() or not fs_init.model_parallel_is_initialized():
        return None
    return _carriers(dist.get_backend_config(model_parallel_group())).get("cuda")


def _rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # When SLURM binds one GPU per task, every task sees a single device, index 0.
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return device


def _pick_backend_and_device(local_rank: int, backend: str | None, device: str | torch.device | None):
    """(what to pass init_process_group as its backend, this rank's device) for a group this call starts."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = _rank_device(device, local_rank)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if device.type != "cuda":
            raise ConfigError(f"backend nccl carries CUDA tensors only; a rank on {device} needs gloo "
                              "(or backend None)")
        backend = NCCL_WITH_GLOO
    return backend, device


def _device_of_started_group(local_rank: int, backend: str | None, device: str | torch.device | None):
    """This rank's device on the group already started: the one asked for if that group carries its tensors over
    the backend asked for, else a ConfigError; None: the started group's own device."""
    config = dist.get_backend_config()
    carriers = _carriers(config)
    if device is None:
        bound = getattr(dist.group.WORLD, "bound_device_id", None)
        if _started_on is not None and _started_on[0] is dist.group.WORLD:
            device = _started_on[1]
        elif bound is not None:
            device = bound
        else:
            device = "cuda" if carriers.get("cuda") == "nccl" or "cpu" not in carriers else "cpu"
    device = _rank_device(device, local_rank)
    started = describe_backend(config)
    if device.type not in carriers:
        raise ConfigError(f"the process group already started ({started}) cannot carry {device.type} tensors: "
                          f"ask for a device it carries, or for none")
    if backend is not None:
        wanted, _ = _pick_backend_and_device(local_rank, backend, device)
        if _carriers(wanted).get(device.type) != carriers[device.type]:
            raise ConfigError(f"the process group is already started on {started}: backend {backend!r} for "
                              f"{device.type} tensors cannot take effect, so it is refused")
    return device


def _gpu_identity(device: torch.device) -> str:
    """What tells this GPU from the others of its host, whatever each rank's CUDA_VISIBLE_DEVICES numbering."""
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except (AttributeError, RuntimeError):
        return f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}#{device.index}"


def check_gpus_not_shared(store: dist.Store, launch: LaunchEnv, device: torch.device, timeout_s: float) -> None:
    """Refuse ranks of one host that would share a GPU, before NCCL is touched (NCCL fails deep inside the first
    collective, "Duplicate GPU detected"). Every rank posts its host and GPU to the rendezvous store and reads
    everyone's, so all ranks raise the same ConfigError."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restarted attempt
    keys = [f"llama_dist/gpu/{attempt}/{rank}" for rank in range(launch.world_size)]
    store.set(keys[launch.rank], json.dumps([socket.gethostname(), _gpu_identity(device), str(device)]))
    store.wait(keys, datetime.timedelta(seconds=timeout_s))
    users: dict[tuple[str, str], list[tuple[int, str]]] = {}
    gpus_of_host: dict[str, set[str]] = {}
    for rank, key in enumerate(keys):
        host, gpu, name = json.loads(store.get(key))
        users.setdefault((host, gpu), []).append((rank, name))
        gpus_of_host.setdefault(host, set()).add(gpu)
    for (host, _), ranks in sorted(users.items()):
        if len(ranks) > 1:
            on_host = sum(len(r) for (h, _), r in users.items() if h == host)
            gpus = torch.cuda.device_count() if host == socket.gethostname() else len(gpus_of_host[host])
            error = ConfigError(
                f"ranks {', '.join(str(r) for r, _ in ranks)} would share {ranks[0][1]} on {host}: {on_host} ranks run "
                f"there on {gpus} visible GPU(s), and NCCL needs one GPU per rank. Start at most {gpus} rank(s) per "
                f"node (torchrun --nproc_per_node {gpus}; NPROC={gpus} for launch/run_local.sh)"
            )
            # Rank 0 may host the store: it leaves only once every other rank has read it (and touches the store
            # no more), so all of them raise this error rather than a lost connection.
            counter, deadline = f"llama_dist/gpu/{attempt}/read", time.monotonic() + timeout_s
            if launch.rank != 0:
                store.add(counter, 1)
                raise error
            while store.add(counter, 0) < launch.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise error


def default_timeout_s() -> float:
    """The process-group timeout in seconds: $LLAMA_DIST_TIMEOUT if set, else DEFAULT_TIMEOUT_S (600)."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    return _checked_timeout(value, f"${TIMEOUT_ENV}")


def _checked_timeout(value, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{what} must be a positive number of seconds, got {value!r}")
    return seconds


def init_distributed(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float | None = None,
    set_threads: bool = True,
) -> DistContext:
    """Start (or join the already started) process group and fairscale's model-parallel group.

    backend/device: None picks cuda:LOCAL_RANK when CUDA is available, the CPU otherwise. On CUDA the group
    carries CUDA tensors over NCCL and CPU tensors and object collectives over gloo (torch's "cpu:gloo,cuda:nccl",
    shown as "nccl+gloo"; backend="nccl" means the same) and NCCL starts at once, bound to the rank's GPU.
    backend="gloo" on a GPU carries CUDA tensors over gloo: slower, but several ranks may share one GPU.

    timeout_s: how long a rank waits for its peers, in the start-up rendezvous and in every collective,
    before it fails (default: $LLAMA_DIST_TIMEOUT, else 600 s). It bounds how long a job outlives a rank that
    died or stalled: with gloo the waiting ranks raise RuntimeError ("Timed out waiting ..."; "Connection
    closed by peer" at once when the peer's process is gone); with NCCL the watchdog tears the process down
    (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, PyTorch's default, which is set here unless the environment chose
    otherwise; 0 would leave a hung collective hanging). Either way the rank exits non-zero and torchrun (or
    `srun --kill-on-bad-exit=1`) stops the rest of the job. It must exceed the longest time one rank can
    legitimately spend outside collectives while others wait, e.g. reading its shards from a slow disk.
    fairscale's model-parallel groups get the same timeout.

    Called again once the group is started, it joins that group and returns its context, with a device the group
    carries: by default the one it was started for. A timeout_s, or a device or backend other than the group's,
    could not take effect then, so it is refused (ConfigError) rather than ignored.
    """
    launch = read_launch_env()
    if dist.is_initialized() and timeout_s is not None:
        raise ConfigError(
            "the process group is already started, with the timeout it was started with: pass timeout_s to the "
            "init_distributed call that starts it (and its DistContext, not timeout_s, to Llama.build)"
        )
    seconds = default_timeout_s() if timeout_s is None else _checked_timeout(timeout_s, "timeout_s")
    timeout = datetime.timedelta(seconds=seconds)

    if dist.is_initialized():
        device = _device_of_started_group(launch.local_rank, backend, device)
    else:
        backend, device = _pick_backend_and_device(launch.local_rank, backend, device)
    if device.type == "cuda":  # also when joining a started group: this thread's kernels go to the rank's GPU
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _start_default_group(launch, backend, device, seconds, set_threads)
        # A script that ends without shutting the group down would leave gloo's threads running into the
        # interpreter's teardown, which can abort the process ("terminate called without an active exception").
        atexit.register(shutdown_distributed)
    if not fs_init.model_parallel_is_initialized():
        _start_model_parallel_groups(timeout)
        global _shm_allreduce
        cpu_over_gloo = _carriers(dist.get_backend_config()).get("cpu") == "gloo"
        if device.type == "cpu" and cpu_over_gloo and os.environ.get("LLAMA_DIST_SHM_ALLREDUCE", "1") != "0":
            _shm_allreduce = create_for_group(fs_init.get_model_parallel_group(), timeout.total_seconds())

    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=launch.local_rank,
        device=device,
        backend=describe_backend(dist.get_backend_config()),
    )


def _start_default_group(launch: LaunchEnv, backend: str, device: torch.device, seconds: float,
                         set_threads: bool) -> None:
    global _started_on
    timeout = datetime.timedelta(seconds=seconds)
    nccl_carries_cuda = device.type == "cuda" and _carriers(backend).get("cuda") == "nccl"
    if nccl_carries_cuda:
        # Tear the process down when a collective outlives the timeout (PyTorch >= 2.2 default).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if device.type == "cpu" and set_threads:
        # Ranks sharing a host share its cores; oversubscribed OpenMP pools slow every rank down.
        per_rank = max(1, (os.cpu_count() or 1) // local_world_size(launch))
        torch.set_num_threads(per_rank)
    # device_id binds the group to the rank's GPU and starts NCCL now, not inside the first collective.
    device_id = device if nccl_carries_cuda else None
    if launch.launcher == "single":
        # A one-rank group needs no rendezvous: an in-memory store avoids picking a port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device_id)
    else:
        store = meet_at_rendezvous(launch, seconds)
        if nccl_carries_cuda:  # gloo may share a GPU between ranks
            check_gpus_not_shared(store, launch, device, seconds)
        dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout, device_id=device_id)
    _started_on = (dist.group.WORLD, device)


def _start_model_parallel_groups(timeout: datetime.timedelta) -> None:
    """fairscale's groups over every rank (those of the model's all-reduces), with our timeout."""
    new_group = dist.new_group
    # The one patch of a library: fairscale's initialize_model_parallel takes no timeout, and torch's new_group
    # defaults to its own (30 min on gloo) rather than the default group's.
    dist.new_group = functools.partial(new_group, timeout=timeout)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale announces each group on stdout
            fs_init.initialize_model_parallel(dist.get_world_size())
    finally:
        dist.new_group = new_group


def shared_memory_allreduce() -> SharedMemoryAllReduce | None:
    """The model-parallel group's shared-memory all-reduce, when all its CPU ranks share this host."""
    return _shm_allreduce


def shutdown_distributed() -> None:
    global _shm_allreduce, _started_on
    _shm_allreduce = None
    _started_on = None
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank() if fs_init.model_parallel_is_initialized() else 0


def all_reduce_min(tensor: torch.Tensor) -> None:
    """The smallest of every rank's `tensor`, in place, on every rank (a no-op without a group)."""
    if dist.is_initialized() and model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=model_parallel_group())


def model_parallel_started() -> bool:
    """Whether init_distributed has started the model-parallel group (loading and forwards need it)."""
    return fs_init.model_parallel_is_initialized()


def model_parallel_world_size() -> int:
    return fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1


def model_parallel_group():
    return fs_init.get_model_parallel_group()


def is_main_process() -> bool:
    if dist.is_initialized():
        return dist.get_rank() == 0
    return read_launch_env().rank == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only: progress and timing must not be repeated by every rank."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s `obj` (any picklable value) on every rank; `src` is a global rank, `group` None is the
    default group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def long_wait_group(timeout_s: float = 7 * 24 * 3600):
    """A gloo group of every rank whose collectives wait up to `timeout_s` (default 7 days), or None for one rank.

    For waits on a person rather than on a peer (rank 0 in input() while the others wait for the text): the
    default group's timeout would end the job after that long idle. Collective: every rank must call it.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


# Where gloo's transport raises a peer's death or a receive timeout; it gives them no type of their own.
_GLOO_TRANSPORT = "gloo/transport/"


def lost_contact(exc: BaseException) -> bool:
    """A peer died or a collective timed out: torch's distributed error types (NCCL, the c10d store, our
    shared-memory all-reduce), or the RuntimeError gloo's transport raises for it."""
    return isinstance(exc, dist.DistError) or (
        type(exc) is RuntimeError and _GLOO_TRANSPORT in str(exc)
    )


class RemoteRankError(RuntimeError):
    """Another rank failed a step that every rank had to pass, with an error that could not be sent as is."""


def _sendable(error: Exception, rank: int) -> Exception:
    """`error` itself if another rank can unpickle it, else a RemoteRankError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - e.g. an exception class whose __init__ takes other arguments
        return RemoteRankError(f"rank {rank} failed: {type(error).__name__}: {error}")


def on_main_then_share(fn, *args, group=None, **kwargs):
    """Run `fn` on rank 0 and give every rank its result, or raise rank 0's error on every rank.

    Input checks run this way, so a bad request fails everywhere with the same error (type and message)
    instead of failing on one rank and leaving the others waiting in a collective. `group`: the process group
    to broadcast over (None: the default group; it must hold global rank 0), e.g. a `long_wait_group()`.
    """
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - whatever rank 0 raises, every rank must raise
            error = exc  # Ctrl-C too: the others are waiting here for rank 0 (e.g. for the user's next turn)
    if dist.is_initialized() and dist.get_world_size() > 1:
        sent = None if error is None else _sendable(error, 0)
        try:
            result, received = broadcast_object((result, sent), group=group)
        except Exception:
            if isinstance(error, KeyboardInterrupt):  # the others were interrupted too, and are gone
                raise error from None
            raise
        if error is None and received is not None:
            raise received
    if error is not None:
        raise error  # rank 0 raises its own exception, with its traceback
    return result


def checked_on_all_ranks(fn, *args, **kwargs):
    """Run `fn` on every rank; if it fails on any rank, raise the same error on every rank.

    For steps that can fail on some ranks only (a file missing on one node, say). Every rank raises the
    error of the lowest failing rank (its type and message), so all ranks report one outcome, as when every
    rank fails alike; an error that cannot be pickled arrives as a RemoteRankError naming it. `fn` must not
    itself use collectives.
    """
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
        error = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        reports: list = [None] * dist.get_world_size()
        dist.all_gather_object(reports, None if error is None else _sendable(error, rank))
        failed = [r for r, report in enumerate(reports) if report is not None]
        if failed:
            first = reports[failed[0]]
            # A rank that failed exactly like the first raises its own error below, with its own traceback.
            if error is None or (type(error), str(error)) != (type(first), str(first)):
                if hasattr(first, "add_note"):  # Python >= 3.11: shown in the traceback, not in str(first)
                    first.add_note(f"(raised on rank {failed[0]}; reported on rank {rank})")
                raise first from error  # a rank that failed differently keeps its own error as the cause
    if error is not None:
        raise error
    return result
