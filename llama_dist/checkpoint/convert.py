"""Checkpoint to checkpoint: moving one between Meta's layout and Hugging Face's (`python -m llama_dist convert
--to hf|meta SRC DST`), saving an int8 copy (`python -m llama_dist quantize SRC DST`), and the same weights as an
in-memory transformers model for comparisons (benchmarks, parity tests).

The name map and the rotary row order live in `llama_dist.checkpoint.hf`; this module only joins a reader of one
layout to the writer of the other. transformers is imported lazily: it is a test/benchmark dependency.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from llama_dist.checkpoint.consolidated import ConsolidatedReader, params_json, write_consolidated
from llama_dist.checkpoint.formats import CheckpointReader, find_tokenizer
from llama_dist.checkpoint.hf import hf_config, hf_tensors, write_hf
from llama_dist.checkpoint.loader import open_checkpoint
from llama_dist.config import ModelArgs
from llama_dist.errors import CheckpointError, ConfigError
from llama_dist.model.quant import PARAMS_FIELD, SCALE_SUFFIX, QuantScheme, make_scheme, quantize_int8
from llama_dist.model.weights import weight_shapes

# Files beside the weights that describe the tokenizer and generation, carried over as they are.
_CARRIED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "generation_config.json", "chat_template.jinja")
LAYOUTS = ("hf", "meta")


class FullTensors(Mapping):
    """Meta's name -> the whole tensor (Meta's rotary order), read from `reader` when asked for."""

    def __init__(self, reader: CheckpointReader, shapes: dict[str, tuple[int, ...]]):
        self.reader, self.shapes = reader, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.read(name, self.shapes[name], None)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def convert(src: str, dst: str, to: str | None = None, shards: int = 1, max_shard_gb: float = 5.0) -> None:
    """Convert the checkpoint SRC (Meta's or Hugging Face's layout, told by its files) into DST in the layout --to.

    Tensors are copied exactly (same dtype, same values): converting back gives the same bytes per tensor.

    Args:
        src: a checkpoint directory of either layout
        dst: a new or empty directory
        to: hf or meta
        shards: consolidated.NN.pth files to write (--to meta): the world sizes that divide it, or that it
            divides, load them
        max_shard_gb: largest safetensors file to write (--to hf), in GiB
    """
    if to not in LAYOUTS:
        raise ConfigError(f"--to must be one of {', '.join(LAYOUTS)}, got {to!r}")
    dst_path = Path(dst)
    if dst_path.exists() and (not dst_path.is_dir() or any(dst_path.iterdir())):
        raise CheckpointError(f"{dst_path} exists and is not an empty directory: convert writes a new checkpoint")
    checkpoint = open_checkpoint(src)
    reader, args = checkpoint.reader, checkpoint.args
    if reader.stored_quantization() is not None:
        raise CheckpointError(f"{reader.location} holds quantized weights: convert the float checkpoint it was made from")
    args.validate()
    shapes = weight_shapes(args)
    reader.check_all_used(set(shapes) | {"output.weight"})
    weights = FullTensors(reader, shapes)
    if to == "hf":
        if shards != 1:
            raise ConfigError("--shards is for --to meta; Hugging Face files are split by size (--max_shard_gb)")
        write_hf(weights, args, dst_path, max_shard_bytes=int(max_shard_gb * 2**30))
    else:
        _write_meta(weights, args, dst_path, shards)
    for name in _CARRIED_FILES:
        if (reader.location / name).is_file():
            shutil.copy2(reader.location / name, dst_path / name)
    print(f"Wrote {dst_path} ({'Hugging Face' if to == 'hf' else 'Meta'} layout) from {reader.location}")


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

    settings = dict(hf_config(args), bos_token_id=None, eos_token_id=None)
    # Llama 3.1 scaling is defined relative to 8192 positions; HF wants the extended length above that.
    settings["max_position_embeddings"] = max(args.max_seq_len, 131072) if args.use_scaled_rope else args.max_seq_len
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


def quantize(src: str, dst: str, mode: str = "int8", keep_output_precision: bool = False) -> None:
    """Write a quantized copy of the float checkpoint SRC to DST: int8 weights with one bfloat16 scale per output
    channel, the same shard count (so it runs on the same world sizes), params.json naming the scheme. Load it
    like any checkpoint (--ckpt_dir DST): no --quantize needed. One process; it holds the int8 checkpoint in memory.

    Args:
        src: a float (bf16/fp16/fp32) Meta checkpoint directory (convert a Hugging Face one with --to meta first)
        dst: the directory to write
        mode: int8 (int4 is quantized at load time: its packed layout depends on the CPU)
        keep_output_precision: keep the output projection as stored
    """
    started = time.perf_counter()
    out = write_quantized(src, dst, make_scheme(mode, keep_output_precision=keep_output_precision))
    size = sum(f.stat().st_size for f in out.glob("consolidated.*.pth"))
    print(f"wrote {out} ({mode}, {size / 2**30:.2f} GiB) in {time.perf_counter() - started:.1f} s")


def write_quantized(src: str | Path, dst: str | Path, scheme: QuantScheme) -> Path:
    """Quantize the float checkpoint at `src` into `dst`: int8 matmul weights with their per-row scales in
    `<name>_scale` (bfloat16), everything else as stored, as many shards as `src` (so it runs on the same world
    sizes), params.json with a `weight_quantization` field naming the scheme, and the source's tokenizer if it has one.

    Runs in one process, one tensor at a time, holding the quantized checkpoint in memory until it is written.
    """
    if scheme.mode != "int8":
        raise ConfigError(
            f"only int8 checkpoints can be saved; {scheme.mode} is quantized at load time (--quantize {scheme.mode}), "
            "since its packed layout depends on the CPU"
        )
    reader = ConsolidatedReader(src)
    if reader.stored_quantization() is not None:
        raise CheckpointError(f"{src} is already quantized ({reader.config_path} has {PARAMS_FIELD})")
    args = reader.stored_args()
    if args is None:
        raise FileNotFoundError(f"params.json not found: {reader.config_path}")
    weights = {}
    for name, shape in weight_shapes(args).items():
        full = reader.read(name, shape, None)
        if scheme.covers(name):
            weights[name], scale = quantize_int8(full)
            weights[name + SCALE_SUFFIX] = scale.to(torch.bfloat16)  # exact: scales are rounded to bf16 precision
        else:
            weights[name] = full.clone()
        reader.release(name)
    params = json.loads(reader.config_path.read_text())
    params[PARAMS_FIELD] = scheme.to_params()
    out = write_consolidated(weights, params, dst, len(reader), reader.embedding_split_dim(args.dim))
    try:
        tokenizer = find_tokenizer(src)
    except FileNotFoundError:
        return out  # weights without a tokenizer: loading will ask for --tokenizer_path, as for the source
    shutil.copyfile(tokenizer, out / tokenizer.name)
    return out
