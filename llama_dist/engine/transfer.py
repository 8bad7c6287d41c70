"""Host tensors to the device without a host sync.

A plain copy from pageable host memory to a GPU returns only once the copy is done (the host waits on the
stream); from pinned memory with non_blocking it is queued like a kernel. A step's inputs go this way, so that a
step's one host sync is rank 0 reading its sampled tokens back (`host_batch.to_host`)."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device` (a torch.device): queued without waiting on CUDA; itself on the CPU."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        # pin_memory() takes the block from torch's caching host allocator, which keeps it until the copy is done.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
