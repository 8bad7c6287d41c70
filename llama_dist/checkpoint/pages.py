"""Giving memory back to the system while loading: the pages of memory-mapped checkpoint tensors once a rank has
copied its slice, and heap pages freed by quantization's temporaries."""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch

_MADV_DONTNEED = 4  # Linux


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) over the whole pages inside a memory-mapped tensor's storage (Linux only).

    For a clean file-backed mapping this only unmaps: a later read faults the data back in from the file.
    """
    libc = _libc()
    if libc is None:
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # only pages wholly inside this tensor
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def give_back_freed_heap() -> None:
    """malloc_trim(0) (glibc): return the free pages inside the heap to the system.

    Quantizing at load frees a float32 temporary per block of rows between the quantized weights it keeps; glibc
    reuses such holes only for allocations that fit them and keeps them resident, so without this a rank held up
    to ~0.9 GiB more than its weights (measured: Llama-3.2-1B shape, int8, 2 ranks), varying from run to run.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    # Python's mmap.madvise needs the mmap object, and torch.load(mmap=True) keeps its own mapping.
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc
