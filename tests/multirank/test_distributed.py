"""Process-group bootstrap: backend choice, rank-0 printing and failing fast."""

import contextlib
import datetime
import io
import os
import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist

from llama_dist.dist.groups import (
    DEFAULT_TIMEOUT_S,
    _pick_backend_and_device,
    default_timeout_s,
    describe_backend,
    init_distributed,
    model_parallel_world_size,
    print0,
    shutdown_distributed,
)
from llama_dist.dist.launch_env import free_port
from llama_dist.dist.local_launch import RankFailure, run_local
from llama_dist.errors import ConfigError, StartupError
from llama_dist.llm import Llama

# ---- backend and device -------------------------------------------------------------------------------


def test_gloo_and_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _pick_backend_and_device(2, None, None) == ("gloo", torch.device("cpu"))


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_nccl_on_the_local_gpu_with_cuda(monkeypatch):
    fake_gpus(monkeypatch, 4)
    # One group for both: CUDA tensors over NCCL, CPU tensors and object collectives over gloo.
    assert _pick_backend_and_device(2, None, None) == ("cpu:gloo,cuda:nccl", torch.device("cuda", 2))
    fake_gpus(monkeypatch, 1)  # SLURM bound one GPU to this task: it is device 0 whatever the local rank
    assert _pick_backend_and_device(2, None, None) == ("cpu:gloo,cuda:nccl", torch.device("cuda", 0))


def test_explicit_backend_and_device_are_honoured(monkeypatch):
    fake_gpus(monkeypatch, 4)
    assert _pick_backend_and_device(1, None, "cpu") == ("gloo", torch.device("cpu"))
    assert _pick_backend_and_device(1, "gloo", "cuda") == ("gloo", torch.device("cuda", 1))  # index from rank
    assert _pick_backend_and_device(1, "nccl", "cuda:3") == ("cpu:gloo,cuda:nccl", torch.device("cuda", 3))
    assert _pick_backend_and_device(0, "gloo", torch.device("cpu")) == ("gloo", torch.device("cpu"))
    with pytest.raises(ConfigError, match="backend nccl carries CUDA tensors only; a rank on cpu needs gloo"):
        _pick_backend_and_device(0, "nccl", "cpu")


def test_backend_names_as_printed():
    assert describe_backend("cpu:gloo,cuda:nccl") == "nccl+gloo"
    assert describe_backend("cpu:gloo,cuda:gloo") == describe_backend("gloo") == "gloo"
    assert describe_backend("nccl") == "nccl"


class GroupStarted(Exception):
    """Raised by a stand-in for dist.init_process_group once it has recorded its arguments."""


def _record_group_start(monkeypatch) -> dict:
    started = {}

    def record(backend, **kwargs):
        started.update(kwargs, backend=backend)
        raise GroupStarted

    monkeypatch.setattr(dist, "init_process_group", record)
    return started


def _one_process_launch(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # what a start on NCCL sets: undone after the test


def test_one_group_starts_nccl_and_gloo_bound_to_the_gpu(monkeypatch):
    """What init_distributed asks torch for on a GPU (no GPU here: torch's call is recorded, not made)."""
    _one_process_launch(monkeypatch)
    fake_gpus(monkeypatch, 2)
    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    started = _record_group_start(monkeypatch)
    for backend in (None, "nccl"):
        with pytest.raises(GroupStarted):
            init_distributed(backend=backend, device="cuda:1", timeout_s=30)
        assert started["backend"] == "cpu:gloo,cuda:nccl" and started["device_id"] == torch.device("cuda", 1)
        assert started["timeout"] == datetime.timedelta(seconds=30)
    assert bound == [torch.device("cuda", 1)] * 2
    with pytest.raises(GroupStarted):  # gloo on a GPU: no NCCL to start eagerly
        init_distributed(backend="gloo", device="cuda:0", timeout_s=30)
    assert started["backend"] == "gloo" and started["device_id"] is None
    with pytest.raises(GroupStarted):
        init_distributed(device="cpu", timeout_s=30, set_threads=False)
    assert started["backend"] == "gloo" and started["device_id"] is None


def test_joining_a_started_group_gives_a_device_it_carries(monkeypatch):
    """A second init_distributed returns the device the started group can use, not the one a fresh start would
    pick; a device or backend the group cannot honour is refused."""
    _one_process_launch(monkeypatch)
    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    cuda0, cpu = torch.device("cuda", 0), torch.device("cpu")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # started by someone else
    try:
        joined = init_distributed()
        assert (joined.device, joined.backend) == (cpu, "gloo")  # a fresh start on this "GPU" machine: NCCL, cuda:0
        assert init_distributed(device="cuda").device == cuda0  # gloo carries CUDA tensors too
        with pytest.raises(ConfigError, match="already started on gloo: backend 'nccl' for cuda tensors cannot"):
            init_distributed(backend="nccl", device="cuda")
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
        joined = init_distributed()
        assert (joined.device, joined.backend) == (cuda0, "nccl+gloo")
        assert init_distributed(device="cpu", backend="gloo").device == cpu
        with pytest.raises(ConfigError, match="already started on nccl\\+gloo: backend 'gloo' for cuda tensors"):
            init_distributed(backend="gloo", device="cuda:0")
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
        with pytest.raises(ConfigError, match="already started \\(nccl\\) cannot carry cpu tensors"):
            init_distributed(device="cpu")
    finally:
        shutdown_distributed()


def test_joining_our_gloo_group_on_a_gpu_keeps_its_device(monkeypatch):
    _one_process_launch(monkeypatch)
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    try:
        started = init_distributed(backend="gloo", device="cuda:1", timeout_s=30)  # a real gloo group
        assert (started.device, started.backend) == (torch.device("cuda", 1), "gloo")
        assert init_distributed() == started
    finally:
        shutdown_distributed()


def _fake_cuda_rank(gpus: int) -> None:
    """This process sees `gpus` GPUs (the first `gpus` of one host), without CUDA: enough to reach the check."""
    import types

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: gpus
    torch.cuda.set_device = lambda device: None
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(uuid=f"GPU-{torch.device(device).index}")


def ranks_sharing_a_gpu_worker(gpus: int):
    _fake_cuda_rank(gpus)
    try:
        init_distributed(timeout_s=30)
    except ConfigError as exc:
        return str(exc)
    return "started"


def group_start_worker(gpus: int, backend: str | None):
    """What this rank asks torch to start, once the shared-GPU check (if any) has let it through. A CPU build
    cannot start a group on CUDA: the call is recorded, not made."""
    _fake_cuda_rank(gpus)
    import llama_dist.dist.groups as distributed

    def record(backend, store, rank, world_size, **kwargs):
        if rank != 0:
            store.add("recorded", 1)  # the last use of the store by this rank
        else:  # rank 0 hosts the store: it must outlive the other ranks' use of it
            while store.add("recorded", 0) < world_size - 1:
                time.sleep(0.01)
        raise RuntimeError(f"init_process_group({backend}, device_id={kwargs['device_id']})")

    distributed.dist.init_process_group = record
    try:
        init_distributed(backend=backend, timeout_s=30)
    except RuntimeError as exc:
        return str(exc)
    return "started"


def distinct_gpus_worker(gpus: int):
    from llama_dist.dist.groups import check_gpus_not_shared
    from llama_dist.dist.launch_env import read_launch_env

    _fake_cuda_rank(gpus)
    launch = read_launch_env()
    store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, launch.rank == 0,
                          timeout=datetime.timedelta(seconds=30))
    check_gpus_not_shared(store, launch, torch.device("cuda", launch.local_rank % gpus), 30)
    if launch.rank != 0:
        store.add("checked", 1)  # the last use of the store by this rank
    else:  # rank 0 hosts the store: it must outlive the other ranks' reads
        while store.add("checked", 0) < launch.world_size - 1:
            time.sleep(0.01)
    return "checked"


def test_ranks_sharing_a_gpu_are_refused_before_nccl():
    """Two ranks on a one-GPU host (the quick start's NPROC=2 on a GPU laptop): one named error on every rank,
    raised before NCCL (absent from this CPU build of torch) is ever touched."""
    for message in run_local(ranks_sharing_a_gpu_worker, 2, 1, timeout_s=120):
        assert message.startswith("ranks 0, 1 would share cuda:0 on "), message
        assert "2 ranks run there on 1 visible GPU(s)" in message and "--nproc_per_node 1" in message, message
    assert run_local(distinct_gpus_worker, 2, 2, timeout_s=120) == ["checked", "checked"]
    # gloo may put several ranks on one GPU (a test setup the GPU set uses): not refused.
    assert run_local(group_start_worker, 2, 1, "gloo", timeout_s=120) == ["init_process_group(gloo, device_id=None)"] * 2
    assert run_local(group_start_worker, 2, 2, None, timeout_s=120) == [
        f"init_process_group(cpu:gloo,cuda:nccl, device_id=cuda:{rank})" for rank in range(2)
    ]


# ---- real ranks -------------------------------------------------------------------------------------------


def init_and_print_worker():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ctx = init_distributed()
        again = init_distributed()  # joining the already started group is a no-op
        print0("hello from rank", ctx.rank)
    try:
        init_distributed(timeout_s=5)
        refused = None
    except ConfigError as exc:
        refused = str(exc)
    total = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(total)
    return {
        "ctx": (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.device.type, ctx.is_main),
        "same_after_second_call": again == ctx,
        "timeout_on_a_started_group": refused,
        "model_parallel_world_size": model_parallel_world_size(),
        "printed": out.getvalue(),
        "sum": total.item(),
    }


def test_init_distributed_on_two_ranks():
    results = run_local(init_and_print_worker, 2, timeout_s=120)
    for rank, result in enumerate(results):
        assert result["ctx"] == (rank, 2, rank, "gloo", "cpu", rank == 0)
        assert result["same_after_second_call"]
        # A timeout that could not take effect is refused, not ignored.
        assert "already started" in result["timeout_on_a_started_group"]
        assert result["model_parallel_world_size"] == 2
        assert result["sum"] == 3.0
    # Only rank 0 prints, and fairscale's group announcements are kept off stdout.
    assert results[0]["printed"] == "hello from rank 0\n"
    assert results[1]["printed"] == ""


def fail_while_peer_waits_worker():
    ctx = init_distributed()
    if ctx.rank == 1:
        time.sleep(0.5)  # let rank 0 enter the collective first
        raise ValueError("rank 1 gives up before the all_reduce")
    dist.all_reduce(torch.ones(1))  # rank 1 never joins: without run_local's help this waits for the timeout
    return "unreachable"


def test_run_local_fails_fast_when_a_rank_raises():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 gives up before the all_reduce"):
        run_local(fail_while_peer_waits_worker, 2)  # default 300 s timeout: it must not be what ends the run
    assert time.monotonic() - start < 30


def test_timeout_defaults_to_600_s_and_reads_llama_dist_timeout(monkeypatch):
    monkeypatch.delenv("LLAMA_DIST_TIMEOUT", raising=False)
    assert default_timeout_s() == DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", "12.5")
    assert default_timeout_s() == 12.5
    for bad in ("ten", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("LLAMA_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"LLAMA_DIST_TIMEOUT must be a positive number of seconds, got '{bad}'"):
            default_timeout_s()


def test_bad_timeout_argument_is_refused_before_any_group_starts():
    with pytest.raises(ConfigError, match="timeout_s must be a positive number of seconds, got 0"):
        init_distributed(timeout_s=0)


def test_llama_build_takes_a_started_group_or_starts_one_never_both(tmp_path):
    ctx = init_distributed()
    try:
        for start_args in ({"timeout_s": 5}, {"backend": "gloo"}, {"device": "cpu"}):
            with pytest.raises(ConfigError, match="either context"):
                Llama.build(tmp_path, context=ctx, **start_args)
    finally:
        shutdown_distributed()


# ---- start-up: every wait bounded by the timeout, a busy or foreign port named as such -----------------------------


class SilentServer:
    """A port held by another program: it accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def _launch_as(monkeypatch, rank: int, world_size: int, port: int, **extra: str) -> None:
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    env = dict(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))


def _failed_start(timeout_s: float) -> tuple[str, float]:
    """(message, seconds) of an init_distributed that must fail with StartupError."""
    start = time.monotonic()
    with pytest.raises(StartupError) as info:
        init_distributed(timeout_s=timeout_s, set_threads=False)
    assert not dist.is_initialized()
    return str(info.value), time.monotonic() - start


def test_port_held_by_a_silent_program_ends_within_the_timeout(monkeypatch, silent_server):
    _launch_as(monkeypatch, 1, 2, silent_server.port)
    message, seconds = _failed_start(2)
    assert "does not answer as a rendezvous store" in message and f":{silent_server.port}" in message, message
    assert seconds < 5, seconds  # torch's store alone waits on it without limit


def test_nothing_listening_ends_at_the_timeout_with_one_message(monkeypatch):
    port = free_port()
    _launch_as(monkeypatch, 1, 2, port)
    message, seconds = _failed_start(2)
    assert "rank 1 could not join the rendezvous" in message and "nothing listens there" in message, message
    assert seconds < 5, seconds
    assert "\n" not in message


def test_busy_port_on_rank_0_is_named_at_once(monkeypatch, silent_server):
    _launch_as(monkeypatch, 0, 2, silent_server.port)
    message, seconds = _failed_start(30)
    assert "rank 0 cannot host the rendezvous" in message and "already in use" in message, message
    assert "set MASTER_PORT to a free port" in message
    assert seconds < 2, seconds


def test_store_of_another_job_is_named(monkeypatch):
    port = free_port()
    other = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    other.set("llama_dist/job", "torchrun run other-job")
    _launch_as(monkeypatch, 1, 2, port, TORCHELASTIC_RUN_ID="this-job")
    message, seconds = _failed_start(10)
    assert "belongs to another job (torchrun run other-job), not to this one (torchrun run this-job)" in message
    assert seconds < 3, seconds


def test_missing_ranks_end_rank_0_within_the_timeout(monkeypatch):
    _launch_as(monkeypatch, 0, 2, free_port())
    message, seconds = _failed_start(2)
    assert "only 1 of 2 ranks reached the rendezvous within the 2 s timeout" in message, message
    assert seconds < 5, seconds


def start_on_held_port_worker(port: int) -> tuple[str, str, float]:
    os.environ["MASTER_PORT"] = str(port)
    start = time.monotonic()
    try:
        init_distributed(timeout_s=3)
        return ("started", "", time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return (type(exc).__name__, str(exc), time.monotonic() - start)


def test_two_ranks_on_a_held_port_each_say_why_within_the_timeout(silent_server):
    rank0, rank1 = run_local(start_on_held_port_worker, 2, silent_server.port, timeout_s=60)
    assert rank0[:1] == ("StartupError",) and "already in use" in rank0[1] and rank0[2] < 2, rank0
    assert rank1[:1] == ("StartupError",) and "does not answer as a rendezvous store" in rank1[1], rank1
    assert rank1[2] < 6, rank1
