"""Giving back the pages of memory-mapped checkpoint tensors once a rank has copied its slice."""

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


@functools.lru_cache(maxsize=1)
def _libc():
    # Python's mmap.madvise needs the mmap object, and torch.load(mmap=True) keeps its own mapping.
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc
