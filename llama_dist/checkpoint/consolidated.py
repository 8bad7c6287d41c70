"""Meta's checkpoint layout: `params.json` + `consolidated.NN.pth` shards (+ Meta's `checklist.chk`).

A checkpoint with S shards runs on N ranks when N % S == 0 (each rank slices one shard) or S % N == 0 (each
rank joins S/N shards). Shards are memory-mapped and a rank copies only the slices it asks for, so its resident
weights stay ~1/N of the checkpoint, never the whole of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llama_dist.checkpoint.pages import drop_mapped_pages
from llama_dist.checkpoint.torch_file import open_torch_file
from llama_dist.config import ModelArgs
from llama_dist.errors import CheckpointError, ConfigError
from llama_dist.model.parallel import ShardSpec
from llama_dist.model.quant import PARAMS_FIELD, SCALE_SUFFIX, QuantScheme
from llama_dist.model.weights import SPLIT_DIM, split_of

SHARD_PATTERN = re.compile(r"consolidated\.(\d{2,})\.pth")
# Present in Llama 2 shards; the model derives RoPE frequencies itself.
IGNORED_KEYS = {"rope.freqs"}


def shard_split_dim(name: str, embedding_split_dim: int = 0) -> int | None:
    """The dimension Meta's shards split weight `name` along (None: a whole copy in every shard).

    Llama 3 shards split tok_embeddings by vocabulary (dim 0), Llama 2 shards by width (dim 1).
    """
    if name.startswith("tok_embeddings."):
        return embedding_split_dim
    if name.endswith(SCALE_SUFFIX):  # per-row scales go with their rows: split by a column split, whole by a row split
        return 0 if shard_split_dim(name.removesuffix(SCALE_SUFFIX)) == 0 else None
    split = split_of(name)
    return None if split is None else SPLIT_DIM[split]


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


def check_world_size(num_shards: int, world_size: int, where) -> None:
    if world_size % num_shards and num_shards % world_size:
        raise CheckpointError(
            f"{where} has {num_shards} shard(s), which cannot be split over {world_size} rank(s): "
            f"the world size must divide or be a multiple of the shard count"
        )


class ConsolidatedReader:
    """Named full-shape tensors of a Meta checkpoint, read slice by slice: every shard is memory-mapped (each read
    checks that the shards' pieces are distinct), and only the slices asked for are copied.

    path: a checkpoint directory, or a single `.pth` file read as a one-shard checkpoint.
    """

    def __init__(self, path: str | Path):
        self.location = Path(path)
        self.paths = checkpoint_files(self.location)
        self.config_path = self.paths[0].parent / "params.json"
        self._open: dict[int, dict[str, torch.Tensor]] = {}
        self._checked_distinct: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def stored_args(self) -> ModelArgs | None:
        """The hyperparameters in params.json beside the shards (None when there is none); Llama 2's vocab_size
        of -1 is read from the embedding's shape."""
        if not self.config_path.is_file():
            return None
        args = ModelArgs.from_params_json(self.config_path)
        if args.vocab_size < 1:
            args.vocab_size = self.vocab_size_from_weights()
        return args

    def stored_quantization(self) -> QuantScheme | None:
        """The scheme of a quantized checkpoint (params.json's weight_quantization field), None for a float one."""
        if not self.config_path.is_file():
            return None
        try:
            field = json.loads(self.config_path.read_text()).get(PARAMS_FIELD)
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ConfigError(f"{self.config_path} is not a JSON object of model parameters: {exc}") from None
        return None if field is None else QuantScheme.from_params(field, self.config_path)

    def embedding_split_dim(self, dim: int) -> int:
        """How the shards split tok_embeddings of width `dim`: 0 by vocabulary (Llama 3), 1 by width (Llama 2)."""
        return 1 if self._tensor(0, "tok_embeddings.weight").shape[1] < dim else 0

    def vocab_size_from_weights(self) -> int:
        # Llama 2 shards split the embedding along its width (every shard holds all the rows), Llama 3 shards
        # along the vocabulary; the (replicated) final norm tells the full width.
        rows = self._tensor(0, "tok_embeddings.weight").shape[0]
        by_vocabulary = self.embedding_split_dim(self._tensor(0, "norm.weight").shape[0]) == 0
        return rows * (len(self) if by_vocabulary else 1)

    def check_world_size(self, world_size: int) -> None:
        check_world_size(len(self.paths), world_size, self.location)

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._open:
            self._open[index] = open_torch_file(self.paths[index])
        return self._open[index]

    def check_all_used(self, used: set[str]) -> None:
        """Refuse a checkpoint holding tensors the model does not use (Llama 2's rope.freqs aside): it is not
        the model the config describes."""
        for index, path in enumerate(self.paths):
            unexpected = set(self.shard(index)) - used - IGNORED_KEYS
            if unexpected:
                raise CheckpointError(f"{path} has tensors this model does not use: {sorted(unexpected)[:5]}")

    def release(self, name: str) -> None:
        """Unmap the pages of tensor `name` from this process once its slice is copied.

        Reading a memory-mapped shard makes the pages it touched part of this rank's resident memory until
        the shard is closed: over a whole load, that is every page read. Dropping them as we go keeps a rank's
        peak at its own slice plus one tensor; the page cache still holds them for the other ranks. Safe at any
        time: a later read of the tensor faults its pages back in.
        """
        for shard in self._open.values():
            if name in shard:
                drop_mapped_pages(shard[name])

    def _tensor(self, index: int, name: str) -> torch.Tensor:
        shard = self.shard(index)
        if name not in shard:
            raise CheckpointError(f"{self.paths[index]} has no tensor {name!r}")
        return shard[name]

    def read(self, name: str, full_shape: tuple[int, ...], want: ShardSpec | None) -> torch.Tensor:
        """The slice `want` of the full tensor `name` (all of it when `want` is None), from whichever shards."""
        pieces = [self._tensor(i, name) for i in range(len(self))]
        where = self.paths[0].parent
        split_dim = _split_dim_in_shards(name, [p.shape for p in pieces], full_shape, where)
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
        distinct = full // size
        # Only KV heads are legitimately stored more than once (each on consecutive shards, when there are more
        # shards than heads); any other weight must be covered exactly once.
        if len(pieces) != distinct and not (_is_kv(name) and len(pieces) % distinct == 0):
            raise CheckpointError(
                f"{where}: {len(pieces)} shard(s) of {name!r} hold {len(pieces) * size} rows along dim {split_dim}, "
                f"more than the {full} that params.json implies: a shard too many (does one repeat another?)"
            )
        # Piece i covers [start_i, start_i + size); with replicated KV heads several pieces cover the same rows.
        starts = [(i * distinct) // len(pieces) * size for i in range(len(pieces))]
        if name not in self._checked_distinct:
            _check_pieces_distinct(name, pieces, starts, self.paths)
            self._checked_distinct.add(name)

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


def _is_kv(name: str) -> bool:
    """wk / wv, or their int8 scales: the tensors Meta's shards may repeat (a KV head on several shards)."""
    return name.endswith(tuple(f"attention.{w}.weight{s}" for w in ("wk", "wv") for s in ("", SCALE_SUFFIX)))


# How much of each piece is compared with the others: a few pages, so checking costs little I/O.
_FINGERPRINT_BYTES = 16384


def _fingerprint(piece: torch.Tensor) -> bytes:
    """The first rows of `piece` (along dim 0, the contiguous way), about _FINGERPRINT_BYTES of them."""
    if piece.dim() == 0 or piece.numel() == 0:
        return b""
    row_bytes = max(1, piece[0].numel() * piece.element_size())
    rows = min(piece.shape[0], max(1, _FINGERPRINT_BYTES // row_bytes))
    head = piece.narrow(0, 0, rows).contiguous().reshape(-1)
    return head.view(torch.uint8).numpy().tobytes()


def _check_pieces_distinct(name, pieces, starts, paths) -> None:
    """Refuse shards where two pieces meant for different rows of `name` are the same bytes: one shard file
    repeating another (right shapes, wrong weights). Pieces of one replicated KV head may be equal."""
    seen: dict[bytes, int] = {}
    for i, piece in enumerate(pieces):
        if i and starts[i] == starts[i - 1]:
            continue  # another copy of the previous piece's KV head
        key = _fingerprint(piece)
        if key in seen:
            raise CheckpointError(
                f"{paths[i]} repeats {paths[seen[key]].name}: both hold the same piece of {name!r}, which each shard "
                f"must hold a different part of (a shard copied over another?)"
            )
        seen[key] = i


def _split_dim_in_shards(name, shapes, full_shape, where) -> int | None:
    """Which dimension the shards split `name` along (None: every shard holds all of it)."""
    if all(tuple(s) == tuple(full_shape) for s in shapes):
        # Several whole copies of a weight Meta splits means params.json undersized it; only KV heads are
        # legitimately copied into every shard (one KV head, several shards).
        is_kv = _is_kv(name)
        if len(shapes) > 1 and shard_split_dim(name) is not None and not is_kv:
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


def params_json(args: ModelArgs) -> dict:
    """Meta's params.json for the model `args` describes (what Meta's own code reads), plus, only where Meta's
    fields cannot say it, this package's: an explicit head_dim, llama3 rope scaling numbers other than Meta's
    8, 1, 4, 8192. A tied output layer is written out as its own weight by the caller (Meta always stores it)."""
    params = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "use_scaled_rope": args.use_scaled_rope,
    }
    if args.explicit_ffn_dim is not None:
        # Meta's rule rounds 8/3 * dim (scaled by ffn_dim_multiplier) up to a multiple of multiple_of: with
        # multiple_of the width itself, any base width up to it rounds to exactly it, in Meta's code too.
        width, base = args.explicit_ffn_dim, int(2 * (4 * args.dim) / 3)
        params.update(multiple_of=width, ffn_dim_multiplier=None if base <= width else width / base)
        if ModelArgs(**params).ffn_hidden_dim != width:
            params.update(multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier,
                          explicit_ffn_dim=width)
    if args.explicit_head_dim is not None and args.explicit_head_dim * args.n_heads != args.dim:
        params["explicit_head_dim"] = args.explicit_head_dim
    defaults = ModelArgs()
    for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context"):
        if args.use_scaled_rope and getattr(args, name) != getattr(defaults, name):
            params[name] = getattr(args, name)
    return params


def write_consolidated(
    weights: dict[str, torch.Tensor],
    params: dict,
    out_dir: str | Path,
    num_shards: int = 1,
    embedding_split_dim: int = 0,
) -> Path:
    """Write full `weights` (Meta's names) as `params.json` + `consolidated.NN.pth` shards.

    embedding_split_dim: 0 splits tok_embeddings by vocabulary (Llama 3 shards), 1 by width (Llama 2 shards).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for name, tensor in weights.items():
        dim = shard_split_dim(name, embedding_split_dim)
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
