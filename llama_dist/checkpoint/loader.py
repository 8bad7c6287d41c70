"""The one way to build a model from a checkpoint: resolve its config once, validate it once, build this rank's
slice and fill it with the slices a format reader hands out.

    model = Transformer.from_pretrained("tiny", "checkpoints/tiny")    # the seed's API: a preset, a process group
    model = load_model("checkpoints/tiny", max_seq_len=256)            # config from params.json (or config.json)
    model = load_model(path, ModelArgs(**transformer_configs[name]))  # a given config, checked against the files
    checkpoint = open_checkpoint(path); ...; load_model(checkpoint)    # look at checkpoint.args before loading

Every rank of the model-parallel group calls it (after `init_distributed`; `from_pretrained` starts the group
itself); loading itself uses no collectives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_dist.checkpoint.formats import CheckpointReader, open_reader
from llama_dist.checkpoint.memory import check_fits_in_memory
from llama_dist.checkpoint.pages import give_back_freed_heap
from llama_dist.checkpoint.progress import Progress
from llama_dist.config import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_SEQ_LEN,
    RUNTIME_FIELDS,
    RUNTIME_LIMITS,
    ModelArgs,
    check_runtime_limits,
    resolve_dtype,
    transformer_configs,
)
from llama_dist.dist.groups import init_distributed, model_parallel_started, model_parallel_world_size
from llama_dist.errors import CheckpointError, ConfigError
from llama_dist.model.llama import Transformer
from llama_dist.model.parallel import ShardSpec, shard_specs, skip_weight_init
from llama_dist.model.quant import SCALE_SUFFIX, Int4Weight, Int8Weight, QuantScheme, make_scheme, packs_int4

# What identifies a model's math (ffn_hidden_dim stands for multiple_of and ffn_dim_multiplier, which can
# spell the same width in several ways; head_dim for an explicit one or dim // n_heads).
_IDENTITY = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_hidden_dim", "norm_eps",
             "rope_theta", "use_scaled_rope", "tie_word_embeddings")
# ... and, when either side scales RoPE frequencies, how.
_ROPE_SCALING = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")


@dataclass
class Checkpoint:
    """An opened checkpoint, the config of the model it holds, and the run's limits the model is built with."""

    reader: CheckpointReader
    args: ModelArgs
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN


def open_checkpoint(
    path: str | Path, config: ModelArgs | None = None, *, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, **runtime,
) -> Checkpoint:
    """Open the checkpoint at `path` and resolve its model's config.

    config=None reads the config stored with the weights (Meta's params.json, Hugging Face's config.json); a given
    config must agree with a stored one wherever both say something (the weights' shapes alone do not decide:
    Llama 3 and 3.1 8B have the same shapes but different RoPE). max_seq_len, max_batch_size: the run's limits
    (they size the KV cache and RoPE tables; kept on the Checkpoint, not in its args). runtime:
    `output_hidden_states`, `output_attentions`, overriding the config's.
    """
    unknown = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if unknown:
        known = RUNTIME_LIMITS + RUNTIME_FIELDS
        raise ConfigError(f"unknown runtime argument(s) {', '.join(map(repr, unknown))}; known: {known}")
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
    return Checkpoint(reader, dataclasses.replace(config, **runtime), max_batch_size, max_seq_len)


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
    quantize: str | QuantScheme | None = None,
    **runtime,
) -> Transformer:
    """This rank's slice of the model in `checkpoint` (a path, or what `open_checkpoint` returned), with its
    weights, RoPE tables and an empty KV cache on `device` in `dtype`.

    quantize: None, "int8", "int4" (groups of 128) or a `QuantScheme`: each rank quantizes its own slice of the
    matmul weights as it reads them (see llama_dist.model.quant). A quantized checkpoint loads as its params.json says
    (quantize may be None, or must name the same scheme).
    config and runtime (max_seq_len, max_batch_size, output_hidden_states, output_attentions): as for
    `open_checkpoint`, when `checkpoint` is a path.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint, config, **runtime)
    elif config is not None or runtime:
        raise ConfigError("pass config and runtime settings to open_checkpoint, not with an opened Checkpoint")
    reader, args = checkpoint.reader, checkpoint.args
    limits = {"max_batch_size": checkpoint.max_batch_size, "max_seq_len": checkpoint.max_seq_len}
    world = model_parallel_world_size()
    check_runtime_limits(**limits)  # the caller's settings: an error there is not the config file's
    try:
        args.validate(world)
    except ConfigError as exc:
        if not reader.config_path.is_file():  # a config the caller gave, with no file to blame
            raise
        raise ConfigError(f"{reader.config_path}: {exc}") from None
    reader.check_world_size(world)
    stored = reader.stored_quantization()
    scheme = _resolve_scheme(make_scheme(quantize), stored, reader.config_path)
    check_fits_in_memory(args, world, torch.device(device), dtype, reader.config_path, scheme, **limits)
    # The checkpoint's own errors first (they need no group); building the split layers needs one.
    if not model_parallel_started():
        raise ConfigError(
            "load_model needs a process group: call llama_dist.init_distributed() first (Llama.build and "
            "Transformer.from_pretrained start one themselves)"
        )
    model, quantized = _empty_model(args, device, dtype, scheme, limits)
    # The bar counts what this rank reads (~1/N of the checkpoint, like every rank); the line, what it read.
    progress = Progress(f"Loading {reader.location.name}", _slice_bytes(model, quantized, dtype, stored),
                        "Read {count} tensors ({size} on rank 0) from " + f"{reader.location}" + " in {seconds:.2f} s")
    used = _fill(model, reader, progress)
    if quantized:
        used |= _fill_quantized(quantized, reader, scheme, stored is not None, device, dtype, progress)
    reader.check_all_used(used)
    progress.done()
    return model


def from_pretrained(
    config: ModelArgs | str, path: str | Path, device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Transformer:
    """`Transformer.from_pretrained`: this rank's slice of the model at `path` (a Meta or Hugging Face checkpoint
    directory, or one `consolidated.00.pth` file), built from `config` (a ModelArgs, or the name of one of
    `transformer_configs`), which must agree with a config stored beside the weights.

    Joins the running process group, or starts one (torchrun's variables, or a one-rank group without them);
    device None: the rank's GPU when CUDA is present, else the CPU. dtype None: bfloat16 on CUDA, float32 on CPU.
    """
    if isinstance(config, str):
        if config not in transformer_configs:
            raise ConfigError(f"unknown model preset {config!r}; known: {', '.join(transformer_configs)}")
        config = ModelArgs(**transformer_configs[config])
    elif not isinstance(config, ModelArgs):
        raise ConfigError(f"config must be a ModelArgs or a preset name, got {type(config).__name__}")
    context = init_distributed(device=device)
    return load_model(open_checkpoint(path, config), device=context.device, dtype=resolve_dtype(dtype, context.device))


Transformer.from_pretrained = staticmethod(from_pretrained)


def _slice_bytes(model: Transformer, quantized: "_Quantized", dtype: torch.dtype, stored: QuantScheme | None) -> int:
    """What this rank reads: its float parameters, and its slices of the weights it quantizes (in `dtype` when
    they are quantized now, one byte a value from an int8 checkpoint)."""
    itemsize = 1 if stored is not None else dtype.itemsize
    total = sum(p.nbytes for p in model.parameters())
    for _, _, _, linears in quantized:
        for linear in linears:
            spec = linear.shard
            rows_or_columns = spec.stop - spec.start
            other = spec.full_shape[1 - spec.dim]
            total += rows_or_columns * other * itemsize
    return total


def _resolve_scheme(requested: QuantScheme | None, stored: QuantScheme | None, where: Path) -> QuantScheme | None:
    """A quantized checkpoint loads as it was saved; asking for another scheme is an error, not a silent choice."""
    if stored is None or requested is None or requested == stored:
        return stored or requested
    raise ConfigError(
        f"{where} holds weights quantized as {stored.to_params()}, which cannot load as {requested.to_params()}: "
        "load it without --quantize, or quantize the float checkpoint"
    )


# (owner module, attribute, Meta names of the stacked weights, their split linears)
_Quantized = list[tuple[torch.nn.Module, str, list[str], list[torch.nn.Module]]]


def _empty_model(args: ModelArgs, device, dtype: torch.dtype, scheme: QuantScheme | None, limits: dict):
    """This rank's slice with uninitialised weights on `device`, ready to be filled, its RoPE tables and KV cache
    sized by `limits` (max_batch_size, max_seq_len), and the weights to fill as quantized stacks (their float
    weights are never allocated)."""
    with torch.device("meta"), skip_weight_init():
        model = Transformer(args)
    quantized: _Quantized = []
    if scheme is not None:
        names = {id(module): name for name, module in model.named_modules()}
        for owner, attribute, linears in model.matmul_weights():
            weight_names = [f"{names[id(linear)]}.weight" for linear in linears]
            if scheme.covers(weight_names[0]):
                quantized.append((owner, attribute, weight_names, linears))
                for linear in linears:
                    # No longer a parameter: the quantized stack replaces it (the split linears' own forward is
                    # not used); a linear that is its own stack (wo, w2, output) gets the quantized module here.
                    del linear.weight
                    linear.weight = None
    model = model.to(dtype=dtype).to_empty(device=device).requires_grad_(False)
    if not quantized:
        model.fuse()  # before filling: the loaded weights land in the stacked tensors
    model.post_init(**limits)
    return model.eval(), quantized


def _checked_read(reader: CheckpointReader, name: str, spec: ShardSpec | None, full_shape, local_shape):
    value = reader.read(name, tuple(full_shape), spec)
    if tuple(value.shape) != tuple(local_shape):
        raise CheckpointError(
            f"{reader.location}: {name!r} slice has shape {tuple(value.shape)}, model expects {tuple(local_shape)}"
        )
    return value


def _fill(model: Transformer, reader: CheckpointReader, progress: Progress) -> set[str]:
    """Copy this rank's slice of every (float) parameter from `reader` into `model`, releasing each tensor once
    copied; returns the names read. A tied output weight is the embedding: listed, and read, once."""
    specs = shard_specs(model)
    for name, param in model.named_parameters():
        spec = specs[name]
        full_shape = spec.full_shape if spec is not None else tuple(param.shape)
        param.copy_(_checked_read(reader, name, spec, full_shape, param.shape))
        reader.release(name)
        progress.advance(param.nbytes)
    return set(specs)


def _fill_quantized(
    quantized: _Quantized, reader, scheme: QuantScheme, prequantized: bool, device, dtype, progress: Progress
) -> set[str]:
    """Read each stack's rows of this rank's slice and set it quantized on its owner; returns the names read."""
    used = set()
    for owner, attribute, names, linears in quantized:
        rows, scales = [], []
        for name, linear in zip(names, linears):
            spec = linear.shard
            local = list(spec.full_shape)
            local[spec.dim] = spec.stop - spec.start
            rows.append(_checked_read(reader, name, spec, spec.full_shape, local))
            used.add(name)
            progress.advance(rows[-1].nbytes)
            if prequantized:
                if rows[-1].dtype != torch.int8:
                    raise CheckpointError(f"{reader.location}: {name!r} is {rows[-1].dtype}, its scheme says int8")
                # Per-row scales: a column split takes its rows' scales, a row split all of them.
                scale_spec = ShardSpec(0, spec.start, spec.stop, spec.full_shape[:1]) if spec.dim == 0 else None
                scales.append(_checked_read(reader, name + SCALE_SUFFIX, scale_spec, spec.full_shape[:1], local[:1]))
                used.add(name + SCALE_SUFFIX)
        stacked = torch.cat(rows).to(device) if len(rows) > 1 else rows[0].to(device)

        def block_done(names=names):  # give back each block's mapped pages and float32 temporaries
            for name in names:
                reader.release(name)
            give_back_freed_heap()

        if prequantized:  # copied: the weight must own its memory, not the reader's mapped pages
            weight = Int8Weight(stacked.clone(), torch.cat(scales).to(device), dtype)
        elif scheme.mode == "int8":
            # A row-parallel rank holds part of each row; its scales are the full rows' (the scale multiplies
            # the partial sum before the all-reduce), as at any other world size and in a saved checkpoint.
            spec = linears[0].shard
            whole_rows = spec.dim == 0 or spec.stop - spec.start == spec.full_shape[1]
            absmax = None if whole_rows else _full_row_absmax(reader, names[0], spec.full_shape).to(device)
            weight = Int8Weight.quantize(stacked, dtype, absmax, block_done)
        else:
            packed = packs_int4(stacked.device, stacked.shape[0], dtype)
            weight = Int4Weight.quantize(stacked, scheme.group_size, dtype, packed, block_done)
        setattr(owner, attribute, weight)
        for name in names:  # after quantizing: `stacked` may be a view of the reader's pages
            reader.release(name)
            reader.release(name + SCALE_SUFFIX)
        del stacked, rows
        give_back_freed_heap()
    return used


def _full_row_absmax(reader: CheckpointReader, name: str, full_shape, block: int = 2048) -> torch.Tensor:
    """The largest |w| of each row of the full weight `name`, read a block of columns at a time (no copy of the
    whole weight; its pages are released with the rank's own slice)."""
    rows, columns = full_shape
    absmax = torch.zeros(rows)
    for start in range(0, columns, block):
        stop = min(columns, start + block)
        part = reader.read(name, tuple(full_shape), ShardSpec(1, start, stop, tuple(full_shape)))
        absmax = torch.maximum(absmax, part.float().abs().amax(dim=1))
    return absmax
