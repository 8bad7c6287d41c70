"""The one way to build a model from a checkpoint: resolve its config once, validate it once, build this rank's
slice and fill it with the slices a format reader hands out.

    model = load_model("checkpoints/tiny", max_seq_len=256)            # config from params.json (or config.json)
    model = load_model(path, ModelArgs(**transformer_configs[name]))  # a given config, checked against the files
    checkpoint = open_checkpoint(path); ...; load_model(checkpoint)    # look at checkpoint.args before loading

Every rank of the model-parallel group calls it; loading itself uses no collectives.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from llama_dist.config import RUNTIME_FIELDS, ModelArgs
from llama_dist.distributed import is_main_process, model_parallel_world_size, print0
from llama_dist.errors import CheckpointError, ConfigError
from llama_dist.formats import CheckpointReader, open_reader
from llama_dist.model import Transformer
from llama_dist.parallel import shard_specs, skip_weight_init

# What identifies a model's math (ffn_hidden_dim stands for multiple_of and ffn_dim_multiplier, which can
# spell the same width in several ways; head_dim for an explicit one or dim // n_heads).
_IDENTITY = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_hidden_dim", "norm_eps",
             "rope_theta", "use_scaled_rope", "tie_word_embeddings")
# ... and, when either side scales RoPE frequencies, how.
_ROPE_SCALING = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")


@dataclass
class Checkpoint:
    """An opened checkpoint and the config of the model it holds (runtime limits included)."""

    reader: CheckpointReader
    args: ModelArgs


def open_checkpoint(path: str | Path, config: ModelArgs | None = None, **runtime) -> Checkpoint:
    """Open the checkpoint at `path` and resolve its model's config.

    config=None reads the config stored with the weights (Meta's params.json, Hugging Face's config.json); a given
    config must agree with a stored one wherever both say something (the weights' shapes alone do not decide:
    Llama 3 and 3.1 8B have the same shapes but different RoPE). runtime: `max_seq_len`, `max_batch_size`,
    `output_hidden_states`, `output_attentions`, overriding the config's.
    """
    unknown = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if unknown:
        raise ConfigError(f"unknown runtime argument(s) {', '.join(map(repr, unknown))}; known: {RUNTIME_FIELDS}")
    reader = open_reader(path)
    stored = reader.stored_args()
    if config is None:
        if stored is None:
            raise FileNotFoundError(f"{reader.config_path.name} not found: {reader.config_path}")
        config = stored
    elif stored is not None:
        _check_agreement(config, stored, reader.config_path)
    if config.vocab_size < 1:  # a given config may leave the vocabulary to the weights
        config = dataclasses.replace(config, vocab_size=stored.vocab_size if stored else reader.vocab_size_from_weights())
    return Checkpoint(reader, dataclasses.replace(config, **runtime))


def _check_agreement(config: ModelArgs, stored: ModelArgs, where: Path) -> None:
    names = _IDENTITY + (_ROPE_SCALING if config.use_scaled_rope or stored.use_scaled_rope else ())
    differing = [
        f"{name}={getattr(config, name)!r} but {where} says {getattr(stored, name)!r}"
        for name in names
        if getattr(config, name) != getattr(stored, name)
        and not (name == "vocab_size" and config.vocab_size < 1)  # the weights decide
    ]
    if differing:
        raise ConfigError("the config does not match the checkpoint: " + "; ".join(differing))


@torch.no_grad()
def load_model(
    checkpoint: Checkpoint | str | Path,
    config: ModelArgs | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **runtime,
) -> Transformer:
    """This rank's slice of the model in `checkpoint` (a path, or what `open_checkpoint` returned), with its
    weights, RoPE tables and an empty KV cache on `device` in `dtype`.

    config and runtime: as for `open_checkpoint`, when `checkpoint` is a path.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint, config, **runtime)
    elif config is not None or runtime:
        raise ConfigError("pass config and runtime settings to open_checkpoint, not with an opened Checkpoint")
    reader, args = checkpoint.reader, checkpoint.args
    world = model_parallel_world_size()
    try:
        args.validate(world)
    except ConfigError as exc:
        raise ConfigError(f"{reader.config_path}: {exc}") from None
    reader.check_world_size(world)
    model = _empty_model(args, device, dtype)
    _fill(model, reader)
    return model


def _empty_model(args: ModelArgs, device, dtype: torch.dtype) -> Transformer:
    """This rank's slice with uninitialised weights on `device`, ready to be filled."""
    with torch.device("meta"), skip_weight_init():
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device=device).requires_grad_(False)
    model.fuse()  # before filling: the loaded weights land in the stacked tensors
    model.post_init()
    return model.eval()


def _fill(model: Transformer, reader: CheckpointReader) -> None:
    """Copy this rank's slice of every weight from `reader` into `model`, releasing each tensor once copied.

    Rank 0 shows its progress (bytes of its slices, ~1/N of the checkpoint like every rank's) as a bar on stderr
    when that is a terminal, else as one line on stdout once done (stderr stays for errors alone).
    """
    specs = shard_specs(model)
    params = list(model.named_parameters())  # a tied output weight is the embedding: listed, and read, once
    total = sum(param.nbytes for _, param in params)
    main = is_main_process()
    show_bar = main and sys.stderr.isatty()
    started = time.perf_counter()
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Loading {reader.location.name}",
        disable=not show_bar,
    )
    with bar:
        for name, param in params:
            _fill_one(reader, name, param, specs[name])
            bar.update(param.nbytes)
    reader.check_all_used(set(specs))
    if main and not show_bar:
        print0(
            f"Read {len(params)} tensors ({total / 2**20:.1f} MiB on rank 0) from {reader.location} in "
            f"{time.perf_counter() - started:.2f} s"
        )


def _fill_one(reader: CheckpointReader, name: str, param: torch.Tensor, spec) -> None:
    full_shape = spec.full_shape if spec is not None else tuple(param.shape)
    value = reader.read(name, full_shape, spec)
    if tuple(value.shape) != tuple(param.shape):
        raise CheckpointError(
            f"{reader.location}: {name!r} slice has shape {tuple(value.shape)}, model expects {tuple(param.shape)}"
        )
    param.copy_(value)
    reader.release(name)
