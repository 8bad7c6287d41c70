"""Meta's `checklist.chk`: one "<md5>  <file name>" line per file of a checkpoint (md5sum's format)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from llama_dist.checkpoint.consolidated import shard_paths
from llama_dist.errors import CheckpointError

CHECKLIST = "checklist.chk"


def file_md5(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex md5 of a file, read in 1 MiB chunks (shards are far larger than memory should hold twice)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_checklist(ckpt_dir: str | Path) -> dict[str, str]:
    """File name -> md5 from `ckpt_dir/checklist.chk`."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    path = ckpt_dir / CHECKLIST
    if not path.is_file():
        raise CheckpointError(f"cannot verify checksums: {path} not found")
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{32}) [ *](.+)", line.strip())
        if match is None:
            raise CheckpointError(f"{path} line {number} is not '<md5>  <file name>': {line!r:.120}")
        md5, name = match.group(1).lower(), match.group(2)
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{path} line {number} names {name!r}, which is not a file of {ckpt_dir}")
        entries[name] = md5
    return entries


def verify_checklist(ckpt_dir: str | Path, part: int = 0, parts: int = 1) -> int:
    """Check the files of `ckpt_dir` against its checklist.chk; raise CheckpointError naming the first bad one.

    A file is bad when its md5 differs from the list, when it is listed but absent, or (for shards) when it is
    present but not listed. `part`/`parts` split the hashing between the ranks of one node: this call hashes
    only every `parts`-th listed file, starting at `part`. Returns the number of files it hashed.
    """
    ckpt_dir = Path(ckpt_dir)
    expected = read_checklist(ckpt_dir)
    checklist = ckpt_dir / CHECKLIST
    unlisted = [p.name for p in shard_paths(ckpt_dir) if p.name not in expected]
    if unlisted:
        raise CheckpointError(f"{ckpt_dir / unlisted[0]} is not listed in {checklist}: cannot verify it")
    names = sorted(expected)[part::parts]
    for name in names:
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {checklist} but missing")
        actual = file_md5(path)
        if actual != expected[name]:
            raise CheckpointError(
                f"{path} has md5 {actual}, but {checklist} says {expected[name]}: the file is corrupt or from "
                f"another checkpoint"
            )
    return len(names)
