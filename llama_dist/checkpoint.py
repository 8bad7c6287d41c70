"""Meta checkpoints (`params.json` + `consolidated.NN.pth`) loaded onto any compatible world size.

A checkpoint with S shards runs on N ranks when N % S == 0 (each rank slices one shard) or S % N == 0 (each
rank joins S/N shards). Shards are memory-mapped and each rank copies only the slices `parallel.py` says it
holds, so a rank's resident weights are ~1/N of the checkpoint, never the whole of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ctypes
import functools
import json
import mmap
import pickle
import re
import sys
from pathlib import Path

import torch

from llama_dist.config import ConfigError, ModelArgs
from llama_dist.distributed import model_parallel_world_size
from llama_dist.model import Transformer
from llama_dist.parallel import ShardSpec, meta_split_dim, shard_specs

SHARD_PATTERN = re.compile(r"consolidated\.(\d{2,})\.pth")
CHECKLIST = "checklist.chk"  # Meta's md5 list: one "<md5>  <file name>" line per file of the checkpoint
# Present in Llama 2 shards; the model derives RoPE frequencies itself.
IGNORED_KEYS = {"rope.freqs"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or cannot be split over this world size."""


def shard_paths(ckpt_dir: str | Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.{S-1}.pth, checked to be complete."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    found = {int(m.group(1)): p for p in ckpt_dir.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))}
    if not found:
        raise FileNotFoundError(f"no consolidated.NN.pth shards in {ckpt_dir}")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise FileNotFoundError(f"{ckpt_dir} lacks shard(s) {', '.join(f'consolidated.{i:02d}.pth' for i in missing)}")
    return [found[i] for i in sorted(found)]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The shard files `path` names: a checkpoint directory's (see shard_paths), or one `.pth` file read as a
    one-shard checkpoint. A file that is one of several `consolidated.NN.pth` shards is refused."""
    path = Path(path)
    if path.is_dir():
        return shard_paths(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if SHARD_PATTERN.fullmatch(path.name):
        siblings = [p for p in path.parent.iterdir() if SHARD_PATTERN.fullmatch(p.name)]
        if len(siblings) > 1:
            raise CheckpointError(
                f"{path} is one of {len(siblings)} shards of a checkpoint: pass the directory {path.parent}"
            )
    return [path]


def _open_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: tensors stay on disk until sliced; weights_only: a checkpoint can never run code.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is not a plain tensor checkpoint (refused to unpickle): {exc}") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from exc


def file_md5(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex md5 of a file, read in 1 MiB chunks (shards are far larger than memory should hold twice)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_checklist(ckpt_dir: str | Path) -> dict[str, str]:
    """File name -> md5 from `ckpt_dir/checklist.chk` (md5sum's format, as Meta ships it)."""
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


_MADV_DONTNEED = 4  # Linux


def _drop_mapped_pages(tensor: torch.Tensor) -> None:
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
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


class ShardSet:
    """The shards of one checkpoint, opened lazily (a rank opens only the shards it reads from)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._open: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._open:
            self._open[index] = _open_shard(self.paths[index])
        return self._open[index]

    def tensor(self, index: int, name: str) -> torch.Tensor:
        shard = self.shard(index)
        if name not in shard:
            raise CheckpointError(f"{self.paths[index]} has no tensor {name!r}")
        return shard[name]

    def release(self, name: str) -> None:
        """Unmap the pages of tensor `name` from this process once its slice is copied.

        Reading a memory-mapped shard makes the pages it touched part of this rank's resident memory until
        the shard is closed: over a whole load, that is every page read. Dropping them as we go keeps a rank's
        peak at its own slice plus one tensor; the page cache still holds them for the other ranks.
        """
        for shard in self._open.values():
            if name in shard:
                _drop_mapped_pages(shard[name])

    def read(self, name: str, full_shape: tuple[int, ...], want: ShardSpec | None) -> torch.Tensor:
        """The slice `want` of the full tensor `name` (all of it when `want` is None), from whichever shards."""
        pieces = [self.tensor(i, name) for i in range(len(self))]
        where = self.paths[0].parent
        split_dim = _checkpoint_split_dim(name, [p.shape for p in pieces], full_shape, where)
        if split_dim is None:
            pieces = pieces[:1]
            split_dim = 0
        size = pieces[0].shape[split_dim]
        full = full_shape[split_dim]
        if len(pieces) * size < full:
            raise CheckpointError(
                f"{where}: {len(pieces)} shard(s) of {name!r} hold {len(pieces) * size} of the {full} rows along "
                f"dim {split_dim} that params.json implies (is a shard missing, or does params.json not match these "
                f"weights?)"
            )
        # Piece i covers [start_i, start_i + size); with replicated KV heads several pieces cover the same rows.
        starts = [(i * (full // size)) // len(pieces) * size for i in range(len(pieces))]

        lo, hi = (want.start, want.stop) if want is not None and want.dim == split_dim else (0, full)
        parts, pos = [], lo
        while pos < hi:
            i = max(j for j, s in enumerate(starts) if s <= pos)
            stop = min(hi, starts[i] + size)
            parts.append(pieces[i].narrow(split_dim, pos - starts[i], stop - pos))
            pos = stop
        if want is not None and want.dim != split_dim:
            parts = [p.narrow(want.dim, want.start, want.stop - want.start) for p in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=split_dim)


def _checkpoint_split_dim(name, shapes, full_shape, where) -> int | None:
    """Which dimension the shards split `name` along (None: every shard holds all of it)."""
    if all(tuple(s) == tuple(full_shape) for s in shapes):
        # Several whole copies of a weight Meta splits means params.json undersized it; only KV heads are
        # legitimately copied into every shard (one KV head, several shards).
        is_kv = name.endswith(("attention.wk.weight", "attention.wv.weight"))
        if len(shapes) > 1 and meta_split_dim(name) is not None and not is_kv:
            raise CheckpointError(
                f"{where}: every shard holds a whole {tuple(full_shape)} {name!r}, but Meta's shards split it: "
                f"params.json does not match these weights"
            )
        return None
    if any(len(s) != len(full_shape) for s in shapes) or len({tuple(s) for s in shapes}) != 1:
        raise CheckpointError(f"{where}: tensor {name!r} has inconsistent shapes across shards: {shapes}")
    differing = [d for d, (a, b) in enumerate(zip(shapes[0], full_shape)) if a != b]
    if len(differing) != 1 or full_shape[differing[0]] % shapes[0][differing[0]]:
        raise CheckpointError(
            f"{where}: tensor {name!r} has shard shape {tuple(shapes[0])}, which does not split the "
            f"expected shape {tuple(full_shape)} (does params.json match these weights?)"
        )
    return differing[0]


def read_model_args(ckpt_dir: str | Path, **runtime) -> ModelArgs:
    """params.json plus runtime limits; a vocab_size of -1 (Llama 2) is read from the embedding's shape."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    args = ModelArgs.from_params_json(ckpt_dir / "params.json", **runtime)
    if args.vocab_size < 1:
        args.vocab_size = _embedding_rows(shard_paths(ckpt_dir)[0])
    return args


def _embedding_rows(shard: Path) -> int:
    """The vocabulary size, read from the embedding in `shard` (for a params.json saying vocab_size -1)."""
    embedding = _open_shard(shard).get("tok_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{shard} has no tok_embeddings.weight to read the vocabulary size from")
    # Llama 2 shards split the embedding along its width, so the row count is the whole vocabulary.
    return embedding.shape[0]


def check_world_size(num_shards: int, world_size: int, where) -> None:
    if world_size % num_shards and num_shards % world_size:
        raise CheckpointError(
            f"{where} has {num_shards} shard(s), which cannot be split over {world_size} rank(s): "
            f"the world size must divide or be a multiple of the shard count"
        )


@torch.no_grad()
def load_weights(model: Transformer, source: str | Path) -> None:
    """Copy this rank's slice of every weight in `source` into `model` (built by Transformer.build).

    source: a checkpoint directory or a single `.pth` file (see checkpoint_files).
    """
    paths = checkpoint_files(source)
    check_world_size(len(paths), model_parallel_world_size(), source)
    shards = ShardSet(paths)
    specs = shard_specs(model)
    for name, param in model.named_parameters():
        spec = specs[name]
        full_shape = spec.full_shape if spec is not None else tuple(param.shape)
        value = shards.read(name, full_shape, spec)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: {name!r} slice has shape {tuple(value.shape)}, model expects {tuple(param.shape)}"
            )
        param.copy_(value)
        shards.release(name)
    unexpected = set(shards.shard(0)) - set(specs) - IGNORED_KEYS
    if unexpected:
        raise CheckpointError(f"{paths[0]} has tensors this model does not use: {sorted(unexpected)[:5]}")


# What identifies a model's math (ffn_hidden_dim stands for multiple_of and ffn_dim_multiplier, which can
# spell the same width in several ways).
_IDENTITY = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
             "use_scaled_rope")


def _check_params_json(config: ModelArgs, params_path: Path) -> None:
    """A params.json beside the weights must describe the model `config` describes (the weights' shapes alone
    do not: Llama 3 and 3.1 8B have the same shapes but different RoPE)."""
    if not params_path.is_file():
        return
    stored = ModelArgs.from_params_json(params_path)
    differing = [
        f"{name}={getattr(config, name)!r} but {params_path} says {getattr(stored, name)!r}"
        for name in _IDENTITY
        if getattr(config, name) != getattr(stored, name)
        and not (name == "vocab_size" and (stored.vocab_size < 1 or config.vocab_size < 1))  # the weights decide
    ]
    if differing:
        raise ConfigError("the config does not match the checkpoint: " + "; ".join(differing))


@torch.no_grad()
def load_pretrained(
    config: ModelArgs | None, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """`Transformer.from_pretrained`: this rank's slice of `config`'s model with its weights from `path`.

    path: a checkpoint directory or a single `.pth` file (see checkpoint_files). config=None reads the
    params.json beside the shards; a given config must agree with that params.json where there is one.
    """
    path = Path(path)
    paths = checkpoint_files(path)
    if config is None:
        config = read_model_args(path if path.is_dir() else path.parent)
    _check_params_json(config, paths[0].parent / "params.json")
    if config.vocab_size < 1:  # Llama 2 style: every shard holds all rows of the embedding
        config = dataclasses.replace(config, vocab_size=_embedding_rows(paths[0]))
    world = model_parallel_world_size()
    config.validate(world)
    check_world_size(len(paths), world, path)
    model = Transformer.build(config, device=device, dtype=dtype)
    load_weights(model, path)
    return model


def load_model(
    ckpt_dir: str | Path,
    max_seq_len: int = 2048,
    max_batch_size: int = 4,
    device="cpu",
    dtype: torch.dtype = torch.float32,
) -> Transformer:
    """Validate, build this rank's slice and load its weights: the whole path from a Meta checkpoint."""
    args = read_model_args(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    try:
        args.validate(model_parallel_world_size())
    except ConfigError as exc:
        raise ConfigError(f"{Path(ckpt_dir) / 'params.json'}: {exc}") from None
    return load_pretrained(args, ckpt_dir, device=device, dtype=dtype)


def meta_weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> full (unsplit) shape of every tensor in a Meta checkpoint for `args`."""
    d, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.n_kv_heads * hd, d),
            p + "attention.wv.weight": (args.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (ffn, d),
            p + "feed_forward.w2.weight": (d, ffn),
            p + "feed_forward.w3.weight": (ffn, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    shapes.update({"norm.weight": (d,), "output.weight": (args.vocab_size, d)})
    return shapes


def random_meta_weights(args: ModelArgs, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full random weights with Meta names: for tests and benchmarks that need no trained model."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in meta_weight_shapes(args).items():
        if len(shape) == 1:  # norm gains near 1, as in trained models
            weights[name] = (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:
            weights[name] = (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(dtype)
    return weights


def save_meta_checkpoint(
    weights: dict[str, torch.Tensor],
    params: dict,
    out_dir: str | Path,
    num_shards: int = 1,
    embedding_split_dim: int = 0,
) -> Path:
    """Write full `weights` as Meta's `params.json` + `consolidated.NN.pth` shards.

    embedding_split_dim: 0 splits tok_embeddings by vocabulary (Llama 3 shards), 1 by width (Llama 2 shards).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for name, tensor in weights.items():
        dim = meta_split_dim(name, embedding_split_dim)
        if dim is None or num_shards == 1:
            parts = [tensor] * num_shards
        else:
            parts = tensor.chunk(num_shards, dim=dim)
            if len(parts) != num_shards or any(p.shape != parts[0].shape for p in parts):
                raise CheckpointError(f"{name} of shape {tuple(tensor.shape)} cannot be split into {num_shards} shards")
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, out_dir / f"consolidated.{i:02d}.pth")
    return out_dir
