"""Hugging Face's Llama layout: `config.json` + `model.safetensors`, or `model-0000K-of-0000N.safetensors` files
listed by `model.safetensors.index.json`. Read slice by slice for each rank, and written by `llama_dist convert`.

How it differs from Meta's layout (the README's "Hugging Face checkpoints" has the whole table):
- names: `model.layers.N.self_attn.q_proj.weight` for `layers.N.attention.wq.weight`, ... (`hf_name`);
- rotary order: Hugging Face rotates the two halves of each head (x_i with x_{i + d/2}), Meta consecutive pairs
  (x_{2i} with x_{2i+1}), so Hugging Face's wq and wk hold each head's rows in another order. The order is undone
  head by head, so a rank that reads only its own heads puts them right alone;
- `tie_word_embeddings`: no `lm_head.weight`; the output layer is the embedding;
- config.json states head_dim and intermediate_size, and the llama3 rope scaling numbers.

Safetensors files are memory-mapped: a rank copies only its slices out of them, and each file is opened for one
tensor at a time, so the pages a rank touches are unmapped again as soon as its slice is copied.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama_dist.config import ModelArgs
from llama_dist.errors import CheckpointError, ConfigError
from llama_dist.model.parallel import ShardSpec

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# Meta's name inside `layers.N.` -> Hugging Face's inside `model.layers.N.`
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_ROTARY = ("attention.wq.weight", "attention.wk.weight")
# Older exports saved RoPE's inverse frequencies as a buffer; the model derives them from config.json.
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_STORAGE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def is_hf_checkpoint(path: Path) -> bool:
    return (path / CONFIG).is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX).is_file())


def hf_name(meta_name: str) -> str:
    """Hugging Face's name of the tensor Meta calls `meta_name`."""
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    match = _META_LAYER.fullmatch(meta_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise KeyError(f"no Hugging Face name for {meta_name!r}")


def rotary_rows_to_hf(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of whole heads of wq or wk, Meta's order -> Hugging Face's: each head's rows (pair i, element a) at
    2i + a move to a * head_dim/2 + i."""
    rows, cols = weight.shape[0], weight.shape[1:]
    return weight.reshape(rows // head_dim, head_dim // 2, 2, *cols).transpose(1, 2).reshape(weight.shape)


def rotary_rows_from_hf(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of rotary_rows_to_hf, on the rows of whole heads."""
    rows, cols = weight.shape[0], weight.shape[1:]
    return weight.reshape(rows // head_dim, 2, head_dim // 2, *cols).transpose(1, 2).reshape(weight.shape)


# ---- config.json <-> ModelArgs --------------------------------------------------------------------------------


def _require(config: dict, key: str, where: Path):
    if config.get(key) is None:
        raise ConfigError(f"{where} has no {key!r}")
    return config[key]


def args_from_hf_config(config: dict, where: Path) -> ModelArgs:
    """The ModelArgs of a Llama config.json (`where` names it in errors)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where} must hold a JSON object, got {type(config).__name__}")
    if config.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where} describes a {config['model_type']!r} model; only 'llama' models run here")
    for key, llama_value in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, llama_value) != llama_value:
            raise ConfigError(f"{where} sets {key}={config[key]!r}; a Llama model has {llama_value!r}")
    dim, n_heads = _require(config, "hidden_size", where), _require(config, "num_attention_heads", where)
    head_dim = config.get("head_dim")
    return ModelArgs(
        dim=dim,
        n_layers=_require(config, "num_hidden_layers", where),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=_require(config, "vocab_size", where),
        norm_eps=config.get("rms_norm_eps", 1e-6),  # transformers' default for Llama
        explicit_head_dim=head_dim if head_dim is not None and (dim % n_heads or head_dim != dim // n_heads) else None,
        explicit_ffn_dim=_require(config, "intermediate_size", where),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        **_rope_settings(config, where),
    )


def _rope_settings(config: dict, where: Path) -> dict:
    """rope_theta and the llama3 scaling numbers, from transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling`."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object, got {rope!r}")
    settings = {"rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0))}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return settings
    if kind != "llama3":
        raise ConfigError(f"{where}: rope type {kind!r} is not supported (only 'default' and 'llama3')")
    original = rope.get("original_max_position_embeddings", config.get("max_position_embeddings"))
    values = {"factor": rope.get("factor"), "low_freq_factor": rope.get("low_freq_factor"),
              "high_freq_factor": rope.get("high_freq_factor"), "original_max_position_embeddings": original}
    missing = [key for key, value in values.items() if value is None]
    if missing:
        raise ConfigError(f"{where}: llama3 rope scaling needs {', '.join(missing)}")
    return dict(
        settings, use_scaled_rope=True, rope_scaling_factor=values["factor"],
        rope_low_freq_factor=values["low_freq_factor"], rope_high_freq_factor=values["high_freq_factor"],
        rope_original_context=original,
    )


def hf_config(args: ModelArgs, dtype: torch.dtype | None = None) -> dict:
    """config.json for the model `args` describes, its weights stored in `dtype`."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {
            "rope_type": "llama3", "factor": args.rope_scaling_factor, "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
        }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        # Informational here (positions are a per-run limit): Llama 3.1 and 3.2 say 131072, Llama 3 8192, Llama 2
        # 4096.
        "max_position_embeddings": 131072 if args.use_scaled_rope else 8192 if args.rope_theta >= 500000 else 4096,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


# ---- reading --------------------------------------------------------------------------------------------------


class HuggingFaceReader:
    """Named full-shape tensors (Meta's names, Meta's rotary order) of a Hugging Face Llama directory."""

    def __init__(self, path: str | Path):
        self.location = Path(path)
        self.config_path = self.location / CONFIG
        self._files = self._tensor_files()
        self._args: ModelArgs | None = None

    def _tensor_files(self) -> dict[str, Path]:
        """Hugging Face name -> the file holding it."""
        index = self.location / INDEX
        if not index.is_file():
            single = self.location / SINGLE_FILE
            with _open(single) as f:
                return {name: single for name in f.keys()}
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index} is not a safetensors index (a JSON object with a weight_map): {exc}"
            ) from exc
        files = {name: self.location / file for name, file in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{self.location} lacks {', '.join(missing)}, which {INDEX} lists")
        return files

    def stored_args(self) -> ModelArgs:
        if self._args is None:
            try:
                config = json.loads(self.config_path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{self.config_path} is not valid JSON: {exc}") from exc
            self._args = args_from_hf_config(config, self.config_path)
        return self._args

    def stored_quantization(self) -> None:
        """Float weights only: a config.json with a quantization_config (GPTQ, AWQ, bitsandbytes...) is refused."""
        config = json.loads(self.config_path.read_text())
        if isinstance(config, dict) and config.get("quantization_config") is not None:
            method = config["quantization_config"].get("quant_method", "?") if isinstance(
                config["quantization_config"], dict) else "?"
            raise CheckpointError(
                f"{self.config_path} describes weights quantized with {method!r}, which do not load here: load a "
                "float (bf16/fp16/fp32) checkpoint, with --quantize int8 or int4 to quantize it at load"
            )
        return None

    def vocab_size_from_weights(self) -> int:
        return self._shape(_TOP_NAMES["tok_embeddings.weight"])[0]

    def check_world_size(self, world_size: int) -> None:
        """Whole tensors split over any world size the config allows."""

    def check_all_used(self, used: set[str]) -> None:
        expected = {self._stored_name(name) for name in used}
        if self.stored_args().tie_word_embeddings:
            expected.add(_TOP_NAMES["output.weight"])  # some exports keep a copy of the tied weight
        unexpected = sorted(n for n in set(self._files) - expected if not _DERIVED.fullmatch(n))
        if unexpected:
            raise CheckpointError(f"{self.location} has tensors this model does not use: {unexpected[:5]}")

    def release(self, name: str) -> None:
        """Nothing held: each read maps its file only while it copies the slice."""

    def _stored_name(self, name: str) -> str:
        if name == "output.weight" and self.stored_args().tie_word_embeddings:
            name = "tok_embeddings.weight"
        return hf_name(name)

    def _file(self, hf: str, meta: str) -> Path:
        if hf not in self._files:
            raise CheckpointError(f"{self.location} has no tensor {hf!r} (Meta's {meta!r})")
        return self._files[hf]

    def _shape(self, hf: str) -> tuple[int, ...]:
        with _open(self._file(hf, hf)) as f:
            return tuple(f.get_slice(hf).get_shape())

    def read(self, name: str, full_shape: tuple[int, ...], want: ShardSpec | None) -> torch.Tensor:
        """The slice `want` of full tensor `name` (all of it when None), read from the file alone."""
        hf = self._stored_name(name)
        path = self._file(hf, name)
        with _open(path) as f:
            stored = f.get_slice(hf)
            shape, dtype = tuple(stored.get_shape()), stored.get_dtype()
            if dtype not in _STORAGE_DTYPES:
                raise CheckpointError(
                    f"{path}: {hf!r} is stored as {dtype}; only {', '.join(_STORAGE_DTYPES)} weights load"
                )
            if shape != tuple(full_shape):
                raise CheckpointError(
                    f"{path}: {hf!r} has shape {shape}, but {self.config_path.name} implies {tuple(full_shape)} "
                    f"for {name!r}"
                )
            if want is None:
                value = stored[:]
            elif want.dim == 0:
                value = stored[want.start : want.stop]
            else:
                value = stored[:, want.start : want.stop]
        if name.endswith(_ROTARY):
            head_dim = self.stored_args().head_dim
            if want is not None and want.dim == 0 and (want.start % head_dim or want.stop % head_dim):
                raise CheckpointError(f"{name!r}: rows {want.start}..{want.stop} split a head of {head_dim} rows")
            value = rotary_rows_from_hf(value, head_dim)
        return value


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


# ---- writing --------------------------------------------------------------------------------------------------


def hf_tensors(weights, args: ModelArgs, tied: bool):
    """(Hugging Face's name, tensor in Hugging Face's rotary order) of each of `weights` (Meta's names and order),
    read one at a time; a tied output weight is left out (it is the embedding)."""
    for name in weights:
        if tied and name == "output.weight":
            continue
        tensor = weights[name]
        yield hf_name(name), rotary_rows_to_hf(tensor, args.head_dim) if name.endswith(_ROTARY) else tensor


def write_hf(weights, args: ModelArgs, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write full `weights` (a mapping from Meta's names, Meta's rotary order) as a Hugging Face directory:
    config.json and model.safetensors, or model-0000K-of-0000N.safetensors + an index when they exceed
    `max_shard_bytes`. Tensors are read from `weights` one at a time, so it may read lazily from a checkpoint.

    An output weight identical to the embedding is stored once, as Hugging Face ties them (Meta's checkpoints of
    Llama 3.2 1B/3B store the same matrix twice).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    embedding = weights["tok_embeddings.weight"]
    tied = args.tie_word_embeddings or (
        "output.weight" in weights
        and weights["output.weight"].dtype == embedding.dtype
        and torch.equal(weights["output.weight"], embedding)
    )
    config = dict(hf_config(args, embedding.dtype), tie_word_embeddings=tied)

    # Each tensor is read once; a file is written when the next tensor would take it past max_shard_bytes, and
    # the files are named once their count is known.
    parts: list[tuple[Path, list[str]]] = []
    tensors, size, total = {}, 0, 0
    umask = os.umask(0)
    os.umask(umask)

    def flush(tensors):
        part = out_dir / f"model-part{len(parts):05d}.safetensors"
        save_file(tensors, part, metadata={"format": "pt"})
        part.chmod(0o666 & ~umask)  # safetensors writes 0600; a shared checkpoint must be readable like any file
        parts.append((part, list(tensors)))

    for name, tensor in hf_tensors(weights, args, tied):
        if tensors and size + tensor.nbytes > max_shard_bytes:
            flush(tensors)
            tensors, size = {}, 0
        tensors[name] = _own_storage(tensor)
        size += tensor.nbytes
        total += tensor.nbytes  # what Hugging Face's index calls total_size: tensor bytes, headers aside
    flush(tensors)
    tensors.clear()
    if len(parts) == 1:
        parts[0][0].rename(out_dir / SINGLE_FILE)
    else:
        weight_map = {}
        for i, (part, stored) in enumerate(parts):
            file = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            part.rename(out_dir / file)
            weight_map.update(dict.fromkeys(stored, file))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage (views of one loaded shard, say): give each its own."""
    tensor = tensor.contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()
