"""All-reduce through shared memory for CPU ranks that share one host (gloo's TCP loopback is far slower for
the small tensors of a decode step: docs/performance.md).

Each rank publishes its partial sum and a sequence number in a shared segment, waits (spinning, then yielding)
until every rank has published, and adds the partials in rank order, so every rank computes the bit-identical
result.

Only used for CPU tensors, on x86-64 (whose store ordering makes "write data, then write flag" safe without
explicit fences), when every rank of the group is on this host; otherwise gloo does the work.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import uuid

import torch
import torch.distributed as dist

# Floats per rank per buffer: a decode step needs batch x dim (32 x 8192 = 262144 for Llama 3 70B).
DEFAULT_CAPACITY = 1 << 20
_FLAG_STRIDE = 8  # one 64-byte cache line per rank's flag, so ranks do not contend for a line


def _segment_bytes(world_size: int, capacity: int) -> int:
    # Two buffers, used alternately: a rank starting call n+1 cannot overwrite what a slower rank is still
    # reading from call n, and it cannot start call n+2 before every rank has started n+1.
    return world_size * _FLAG_STRIDE * 8 + 2 * world_size * capacity * 4


class PeerLostError(dist.DistError):
    """A peer rank exited, or did not arrive within the timeout, during a shared-memory all-reduce."""


class SharedMemoryAllReduce:
    def __init__(self, path: str, rank: int, world_size: int, capacity: int, timeout_s: float, pids: list[int]):
        self.rank, self.world_size, self.capacity, self.timeout_s = rank, world_size, capacity, timeout_s
        self.pids = pids  # to notice a peer that died: nothing else would tell a rank waiting on memory
        flag_words = world_size * _FLAG_STRIDE
        raw = torch.from_file(path, shared=True, size=_segment_bytes(world_size, capacity), dtype=torch.uint8)
        self._flags = raw[: flag_words * 8].view(torch.int64)[::_FLAG_STRIDE]
        self._flags_np = self._flags.numpy()  # same memory; polling it costs ~1 us instead of a torch op's ~8
        self._buffers = raw[flag_words * 8 :].view(torch.float32).view(2, world_size, capacity)
        self._seq = 0

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.numel() <= self.capacity

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks, in place; every rank gets the same bits."""
        n = tensor.numel()
        self._seq += 1
        slots = self._buffers[self._seq % 2]
        slots[self.rank, :n].copy_(tensor.reshape(-1))
        self._flags[self.rank] = self._seq  # publish after the data: x86 keeps stores in order
        self._wait_for_all(self._seq)
        total = slots[0, :n].clone()
        for r in range(1, self.world_size):
            total += slots[r, :n]
        tensor.copy_(total.view(tensor.shape))
        return tensor

    def _wait_for_all(self, seq: int) -> None:
        spins, deadline, next_check = 0, None, 0.0
        while self._flags_np.min() < seq:
            spins += 1
            if spins <= 100:
                continue
            os.sched_yield()  # beyond a short spin, let other processes (maybe our peers) have the core
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.timeout_s
            if now >= next_check:  # a few times a second: has a late peer died?
                next_check = now + 0.2
                late = [r for r, f in enumerate(self._flags_np.tolist()) if f < seq]
                dead = [r for r in late if not process_alive(self.pids[r])]
                if dead:
                    raise PeerLostError(f"peer rank(s) {dead} exited during a shared-memory all-reduce")
                if now > deadline:
                    raise PeerLostError(
                        f"Timed out waiting {self.timeout_s:.0f} s for peer rank(s) {late} in a shared-memory all-reduce"
                    )


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An exited child of ours that nobody has reaped yet still answers; its state says it is gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def usable_here() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


def create_for_group(group, timeout_s: float, capacity: int = DEFAULT_CAPACITY) -> SharedMemoryAllReduce | None:
    """Collective over `group`: a shared segment when all its ranks are on this host, else None."""
    world = dist.get_world_size(group)
    if world == 1 or not usable_here():
        return None
    rank = dist.get_rank(group)
    peers: list = [None] * world
    dist.all_gather_object(peers, (socket.gethostname(), usable_here(), os.getpid()), group=group)
    if len({host for host, _, _ in peers}) != 1 or not all(ok for _, ok, _ in peers):
        return None
    holder = [f"/dev/shm/llama_dist_{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    path = holder[0]
    if rank == 0:
        with open(path, "wb") as f:  # zero-filled: every flag starts at sequence 0
            f.truncate(_segment_bytes(world, capacity))
    dist.barrier(group=group)
    segment = SharedMemoryAllReduce(path, rank, world, capacity, timeout_s, [pid for _, _, pid in peers])
    dist.barrier(group=group)
    if rank == 0:
        os.unlink(path)  # every rank has it mapped; the name is not needed any more, and nothing can leak
    return segment
