"""Checkpoint to checkpoint: moving one between Meta's layout and Hugging Face's (`python -m llama_dist convert
--to hf|meta SRC DST`), saving an int8 copy (`python -m llama_dist quantize SRC DST`), and the same weights as an
in-memory transformers model for comparisons (benchmarks, parity tests).

The name map and the rotary row order live in `llama_dist.checkpoint.hf`; this module only joins a reader of one
layout to the writer of the other. transformers is imported lazily: it is a test/benchmark dependency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from llama_dist.checkpoint.consolidated import ConsolidatedReader, params_json, write_consolidated
from llama_dist.checkpoint.formats import CheckpointReader, find_tokenizer
from llama_dist.checkpoint.hf import hf_config, hf_tensors, write_hf
from llama_dist.checkpoint.loader import open_checkpoint
from llama_dist.checkpoint.progress import Progress, human_size
from llama_dist.config import ModelArgs
from llama_dist.errors import CheckpointError, ConfigError
from llama_dist.model.quant import PARAMS_FIELD, SCALE_SUFFIX, QuantScheme, make_scheme, quantize_int8
from llama_dist.model.weights import weight_shapes

# Files beside the weights that describe the tokenizer and generation, carried over as they are.
_CARRIED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "generation_config.json", "chat_template.jinja")
LAYOUTS = ("hf", "meta")


@contextlib.contextmanager
def new_checkpoint_dir(src: str | Path, dst: str | Path, overwrite: bool):
    """A directory to write the checkpoint made from `src` into; renamed to `dst` once the block ends without an
    error, removed otherwise, so an interrupted run leaves nothing half-written.

    Refused (CheckpointError, before anything is read): `dst` being `src`, inside it or holding it, or a non-empty
    directory or a file unless `overwrite` (which replaces `dst` only after the new checkpoint is complete, and
    never touches the source)."""
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if dst_path == src_path or src_path in dst_path.parents:
        raise CheckpointError(f"{dst} is the source checkpoint {src} or inside it: write the new one elsewhere")
    if dst_path in src_path.parents:
        raise CheckpointError(f"{dst} holds the source checkpoint {src}: write the new one elsewhere")
    if dst_path.exists() and not dst_path.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory")
    if dst_path.is_dir() and any(dst_path.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst} is not an empty directory: give a new one, or --overwrite to replace it")
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.partial-", dir=dst_path.parent))
    try:
        yield partial
        if dst_path.exists():  # empty, or replaced with --overwrite: the old one goes only now
            retired = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.old-", dir=dst_path.parent))
            dst_path.rename(retired / dst_path.name)
            partial.rename(dst_path)
            shutil.rmtree(retired)
        else:
            partial.rename(dst_path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _carry_files(src: Path, dst: Path) -> None:
    for name in _CARRIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


class FullTensors(Mapping):
    """Meta's name -> the whole tensor (Meta's rotary order), read from `reader` when asked for."""

    def __init__(self, reader: CheckpointReader, shapes: dict[str, tuple[int, ...]], description: str | None = None):
        self.reader, self.shapes, self._seen = reader, shapes, set()
        # Reading is most of the work (the writers take each tensor once): the bar counts tensors handed out.
        self.progress = Progress(description or "Reading", len(shapes), "Read {count} tensors in {seconds:.1f} s",
                                 in_bytes=False) if description else None

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.reader.read(name, self.shapes[name], None)
        if self.progress is not None and name not in self._seen:  # a writer may read a tensor twice (sizes first)
            self._seen.add(name)
            self.progress.advance()
        return tensor

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def convert(src: str, dst: str, to: str | None = None, shards: int = 1, max_shard_gb: float = 5.0,
            overwrite: bool = False) -> None:
    """Convert the checkpoint SRC (Meta's or Hugging Face's layout, told by its files) into DST in the layout --to.

    Tensors are copied exactly (same dtype, same values): converting back gives the same bytes per tensor.
    DST appears only once complete (written beside it first, then renamed).

    Args:
        src: a checkpoint directory of either layout
        dst: a new or empty directory (never SRC or inside it)
        to: hf or meta
        shards: consolidated.NN.pth files to write (--to meta): the world sizes that divide it, or that it
            divides, load them
        max_shard_gb: largest safetensors file to write (--to hf), in GiB
        overwrite: replace a DST that is not empty (once the new checkpoint is complete)
    """
    if to not in LAYOUTS:
        raise ConfigError(f"--to must be one of {', '.join(LAYOUTS)}, got {to!r}")
    if to == "hf" and shards != 1:
        raise ConfigError("--shards is for --to meta; Hugging Face files are split by size (--max_shard_gb)")
    with new_checkpoint_dir(src, dst, overwrite) as out:
        checkpoint = open_checkpoint(src)
        reader, args = checkpoint.reader, checkpoint.args
        if reader.stored_quantization() is not None:
            raise CheckpointError(
                f"{reader.location} holds quantized weights: convert the float checkpoint it was made from")
        args.validate()
        shapes = weight_shapes(args)
        reader.check_all_used(set(shapes) | {"output.weight"})
        weights = FullTensors(reader, shapes, f"Converting {reader.location.name}")
        if to == "hf":
            write_hf(weights, args, out, max_shard_bytes=int(max_shard_gb * 2**30))
        else:
            _write_meta(weights, args, out, shards)
        weights.progress.done()
        _carry_files(reader.location, out)
    print(f"Wrote {dst} ({'Hugging Face' if to == 'hf' else 'Meta'} layout, {human_size(_size_of(Path(dst)))}) "
          f"from {reader.location}")


def _size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _write_meta(weights: FullTensors, args: ModelArgs, dst: Path, shards: int) -> None:
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"--shards must be a positive integer, got {shards!r}")
    try:
        args.validate(world_size=shards)
    except ConfigError as exc:
        raise ConfigError(f"cannot split into {shards} shards: {exc}") from None
    if shards > args.n_kv_heads:
        raise ConfigError(
            f"--shards {shards} exceeds n_kv_heads={args.n_kv_heads}: Meta's layout would copy KV heads into "
            f"several shards, which this writer does not do"
        )
    full = dict(weights.items())
    if args.tie_word_embeddings:  # Meta's checkpoints always store the output layer, also when it is the embedding
        full["output.weight"] = full["tok_embeddings.weight"]
    untied = dataclasses.replace(args, tie_word_embeddings=False)
    write_consolidated(full, params_json(untied), dst, num_shards=shards)


# ---- the same weights in transformers, in memory -----------------------------------------------------------------


def hf_state_dict(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Full weights with Meta's names -> LlamaForCausalLM's names and rotary row order."""
    return dict(hf_tensors(weights, args, tied=args.tie_word_embeddings))


def transformers_model(weights: dict[str, torch.Tensor], args: ModelArgs, dtype=torch.float32, **config_overrides):
    """A LlamaForCausalLM holding `weights` (Meta names), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # max_position_embeddings stays hf_config's: the model's own context (131072 with Llama 3.1 scaling, which is
    # defined relative to 8192 positions; 8192 or 4096 without), as its published config.json says. The run's
    # max_seq_len is no longer in `args`, and transformers' default and llama3 RoPE do not read this field (only
    # its dynamic scalings do): pass max_position_embeddings= to override it.
    settings = dict(hf_config(args), bos_token_id=None, eos_token_id=None)
    settings.update(config_overrides)
    config = LlamaConfig.from_dict(settings)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(hf_state_dict(weights, args), assign=True, strict=False)
    if args.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KeyError(f"weights missing for {missing[:3]}")
    # Buffers (RoPE inverse frequencies) were created on the meta device, without values: rebuild them on CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(dtype).eval()


def quantize(src: str, dst: str, mode: str = "int8", keep_output_precision: bool = False,
             overwrite: bool = False) -> None:
    """Write a quantized copy of the float checkpoint SRC to DST: int8 weights with one bfloat16 scale per output
    channel, in Meta's layout (a Hugging Face SRC becomes one shard), the same shard count as a Meta SRC (so it
    runs on the same world sizes), params.json naming the scheme. Load it like any checkpoint (--ckpt_dir DST):
    no --quantize needed. One process; it holds the int8 checkpoint in memory. DST appears only once complete.

    Args:
        src: a float (bf16/fp16/fp32) checkpoint directory, Meta's or Hugging Face's
        dst: a new or empty directory (never SRC or inside it)
        mode: int8 (int4 is quantized at load time: its packed layout depends on the CPU)
        keep_output_precision: keep the output projection as stored
        overwrite: replace a DST that is not empty (once the new checkpoint is complete)
    """
    started = time.perf_counter()
    scheme = make_scheme(mode, keep_output_precision=keep_output_precision)
    with new_checkpoint_dir(src, dst, overwrite) as out:
        write_quantized(src, out, scheme)
    size = sum(f.stat().st_size for f in Path(dst).glob("consolidated.*.pth"))
    print(f"wrote {dst} ({mode}, {human_size(size)}) in {time.perf_counter() - started:.1f} s")


def write_quantized(src: str | Path, dst: str | Path, scheme: QuantScheme) -> Path:
    """Quantize the float checkpoint at `src` into `dst`: int8 matmul weights with their per-row scales in
    `<name>_scale` (bfloat16), everything else as stored, in Meta's layout with as many shards as a Meta `src` (one
    for a Hugging Face one, whose tied output weight is stored apart, as Meta's files do), params.json with a
    `weight_quantization` field naming the scheme, and the source's tokenizer files.

    Runs in one process, one tensor at a time, holding the quantized checkpoint in memory until it is written.
    """
    if scheme.mode != "int8":
        raise ConfigError(
            f"only int8 checkpoints can be saved; {scheme.mode} is quantized at load time (--quantize {scheme.mode}), "
            "since its packed layout depends on the CPU"
        )
    checkpoint = open_checkpoint(src)
    reader, args = checkpoint.reader, checkpoint.args
    if reader.stored_quantization() is not None:
        raise CheckpointError(f"{src} is already quantized ({reader.config_path} has {PARAMS_FIELD})")
    meta = isinstance(reader, ConsolidatedReader)
    shapes = weight_shapes(args)
    source = FullTensors(reader, shapes, f"Quantizing {reader.location.name}")
    weights = {}
    for name in shapes:
        full = source[name]
        if scheme.covers(name):
            weights[name], scale = quantize_int8(full)
            weights[name + SCALE_SUFFIX] = scale.to(torch.bfloat16)  # exact: scales are rounded to bf16 precision
        else:
            weights[name] = full.clone()
        reader.release(name)
    if args.tie_word_embeddings:  # Meta's layout always stores the output layer, also when it is the embedding
        embedding = weights["tok_embeddings.weight"]
        weights["output.weight"], scale = quantize_int8(embedding) if scheme.covers("output.weight") else (embedding, None)
        if scale is not None:
            weights["output.weight" + SCALE_SUFFIX] = scale.to(torch.bfloat16)
        args = dataclasses.replace(args, tie_word_embeddings=False)
    source.progress.done()
    params = json.loads(reader.config_path.read_text()) if meta else params_json(args)
    params[PARAMS_FIELD] = scheme.to_params()
    shards, embedding_split = (len(reader), reader.embedding_split_dim(args.dim)) if meta else (1, 0)
    out = write_consolidated(weights, params, dst, shards, embedding_split)
    _carry_files(reader.location, out)
    if meta and not (out / "tokenizer.model").is_file():
        try:
            tokenizer = find_tokenizer(src)  # Llama 2 keeps it beside the checkpoint directory
        except FileNotFoundError:
            return out  # weights without a tokenizer: loading will ask for --tokenizer_path, as for the source
        shutil.copyfile(tokenizer, out / tokenizer.name)
    return out
