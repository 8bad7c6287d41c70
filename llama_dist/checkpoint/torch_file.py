"""One `torch.save` archive (a `consolidated.NN.pth` shard) opened without trusting it: weights only (a file can
never run code), every tensor's bytes exactly the record its header names, then memory-mapped."""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from llama_dist.errors import CheckpointError


def open_torch_file(path: Path) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt: it is not a torch.save archive")
    try:
        # weights_only: a checkpoint can never run code.
        check_storage_records(path, torch.load(path, map_location="meta", weights_only=True))
        # mmap: tensors stay on disk until sliced.
        tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is not a plain tensor checkpoint (refused to unpickle): {_without_advice(exc)}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, struct.error) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from exc
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path} does not hold a dict of named tensors")
    return tensors


def _without_advice(exc: Exception) -> str:
    """What torch's weights-only refusal found (e.g. "unsupported GLOBAL posix.system"), without its advice to load
    with weights_only=False: never do that with a file you do not trust."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", str(exc)):
        paragraph = " ".join(paragraph.split()).removeprefix("WeightsUnpickler error: ")
        paragraph = re.split(r"\s*Please use `?torch\.serialization", paragraph)[0]
        if paragraph and not re.search(r"weights_only|safe_globals|trusted source|Weights only load failed", paragraph):
            kept.append(paragraph)
    return " ".join(kept) or "it holds objects other than tensors"


def _record_sizes(path: Path) -> dict[int, int]:
    """Where each stored (uncompressed) record's bytes start in the file, and how many there are."""
    sizes = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            raw.seek(info.header_offset)
            header = raw.read(30)  # the local file header: its name and extra-field lengths end it
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_length + extra_length
            sizes[start] = info.file_size if info.compress_type == zipfile.ZIP_STORED else -1
    return sizes


def check_storage_records(path: Path, tensors) -> None:
    """Refuse a shard whose tensors claim bytes their records do not hold.

    A memory-mapped load trusts each storage's declared size: a record shorter than it would make a tensor read
    its neighbour's bytes (or past the end of the file). Loading on the meta device reads only the header and
    tells where each storage starts; every storage must be exactly its record, and every tensor inside its storage.
    """
    if not isinstance(tensors, dict):
        return  # refused by the caller
    records = _record_sizes(path)
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        storage = tensor.untyped_storage()
        start = getattr(storage, "_checkpoint_offset", None)
        declared, stored = storage.nbytes(), records.get(start)
        if stored is None or stored != declared:
            held = "no stored record" if stored in (None, -1) else f"a record of {stored} bytes"
            raise CheckpointError(
                f"{path}: tensor {name!r} declares {declared} bytes of storage but the file has {held} for it "
                f"(the shard is corrupt or was tampered with)"
            )
        if tensor.numel():
            last = tensor.storage_offset() + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
            if tensor.storage_offset() < 0 or (last + 1) * tensor.element_size() > declared:
                raise CheckpointError(
                    f"{path}: tensor {name!r} of shape {tuple(tensor.shape)} reaches beyond its {declared}-byte storage"
                )
