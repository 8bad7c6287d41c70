"""Model hyperparameters (Meta's params.json fields), the runtime limits of one model instance, named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_dist.errors import ConfigError

# The one default of each runtime limit, for the Python API and the command line alike. The limits size the KV cache
# and the RoPE tables, so they are chosen per run (load_model, Llama.build, Transformer.setup_caches), never by
# ModelArgs, which describes the model only.
DEFAULT_MAX_SEQ_LEN = 512  # positions per sequence (prompt + generation): what the KV cache holds
DEFAULT_MAX_BATCH_SIZE = 4  # sequences decoded together
RUNTIME_LIMITS = ("max_batch_size", "max_seq_len")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CACHE_ENV = "LLAMA_DIST_CACHE"


def cache_dir() -> Path:
    """Where llama-dist keeps what it measured or built for this machine (kernel tables, compiled kernels):
    $LLAMA_DIST_CACHE, else ~/.cache/llama_dist."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llama_dist")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_runtime_limits(max_batch_size, max_seq_len) -> None:
    """The limits chosen for a run are positive integers."""
    _check_positive("max_batch_size", max_batch_size)
    _check_positive("max_seq_len", max_seq_len)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # Llama 2's params.json says -1: the checkpoint's embedding shape decides
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama 2's value; Llama 3 params.json files carry their own
    use_scaled_rope: bool = False
    # Llama 3.1's frequency scaling (used when use_scaled_rope). Meta's params.json has no field for these: its
    # reference code hard-codes 8, 1, 4 and 8192, kept here as defaults. Hugging Face configs carry their own
    # (Llama 3.2's factor is 32).
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    # What Hugging Face configs state outright and Meta's params.json derives: None keeps Meta's derivation
    # (dim // n_heads; the multiple_of / ffn_dim_multiplier rounding rule).
    explicit_head_dim: int | None = None
    explicit_ffn_dim: int | None = None
    # The output layer is the embedding (Llama 3.2 1B/3B on Hugging Face): one weight, stored once per rank.
    tie_word_embeddings: bool = False

    # Runtime defaults for what a forward returns besides logits (a call's own arguments override them).
    output_hidden_states: bool = False
    output_attentions: bool = False

    def __new__(cls, *args, **kwargs):
        # Meta's reference ModelArgs carries max_batch_size and max_seq_len; here they belong to the run, and a
        # dataclass would only say "unexpected keyword argument". __new__ sees the same arguments before __init__.
        moved = [name for name in RUNTIME_LIMITS if name in kwargs]
        if moved:
            raise ConfigError(
                f"ModelArgs describes the model only: pass {' and '.join(moved)} to load_model, open_checkpoint or "
                f"Llama.build (or call model.setup_caches(max_batch_size, max_seq_len)), not to ModelArgs"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim if self.explicit_head_dim is not None else self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: explicit_ffn_dim when given, else 2/3 of 4*dim, scaled by ffn_dim_multiplier, rounded up
        to multiple_of (Meta's rule)."""
        if self.explicit_ffn_dim is not None:
            return self.explicit_ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_parameters(self, tied_embeddings: bool | None = None) -> int:
        """Parameters of the whole (unsplit) model; tied_embeddings (default: tie_word_embeddings) counts
        `output` as sharing the embedding.

        Meta's checkpoints always store `output.weight`, also for Llama 3.2 1B/3B where it equals the
        embedding (Hugging Face ties the two, hence its smaller published counts for those models).
        """
        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be positive to count parameters, got {self.vocab_size}")
        d, hd = self.dim, self.head_dim
        attention = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)  # wq, wo; wk, wv
        per_layer = attention + 3 * d * self.ffn_hidden_dim + 2 * d  # + w1, w2, w3 and two norm gains
        tied = self.tie_word_embeddings if tied_embeddings is None else tied_embeddings
        embeddings = self.vocab_size * d * (1 if tied else 2)
        return embeddings + self.n_layers * per_layer + d  # + final norm

    @classmethod
    def from_params_json(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"params.json not found: {path}")
        try:
            params = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(params, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(params).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in RUNTIME_FIELDS}
        # Meta's files carry extra keys (e.g. quantization, vision fields) that do not shape a text model; a null
        # where the field has a value by default (Llama 4's rope_scaling_factor) means that default.
        return cls(**{
            k: v for k, v in params.items() if k in fields and (v is not None or fields[k].default is None)
        })

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError when these shapes cannot run on `world_size` tensor-parallel ranks."""
        positive = ["dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"]
        positive += [name for name in ("explicit_head_dim", "explicit_ffn_dim") if getattr(self, name) is not None]
        for name in positive:
            _check_positive(name, getattr(self, name))
        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be positive (got {self.vocab_size}); read it from the checkpoint")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.use_scaled_rope:
            self._validate_rope_scaling()
        if self.explicit_head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.n_heads % world_size:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by the world size {world_size}: "
                f"run with a number of ranks that divides {self.n_heads}"
            )
        kv, n = self.n_kv_heads, world_size
        if (n <= kv and kv % n) or (n > kv and n % kv):
            raise ConfigError(
                f"n_kv_heads={kv} and world size {n}: one must divide the other so every rank owns whole KV heads"
            )
        if self.vocab_size % world_size:
            raise ConfigError(f"vocab_size={self.vocab_size} is not divisible by the world size {world_size}")
        if self.ffn_hidden_dim % world_size:
            raise ConfigError(f"FFN width {self.ffn_hidden_dim} is not divisible by the world size {world_size}")

    def _validate_rope_scaling(self) -> None:
        for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            # The blend between the two bands divides by their difference.
            raise ConfigError(
                f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"rope_low_freq_factor={self.rope_low_freq_factor}"
            )


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: bfloat16 on CUDA (Meta's weights are bf16), float32 on CPU (the exact reference path)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}")


# Runtime fields of ModelArgs (what a forward returns by default): chosen per run, never part of a checkpoint's
# params.json.
RUNTIME_FIELDS = ("output_hidden_states", "output_attentions")

_LLAMA2 = {"vocab_size": 32000, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 10000.0, "use_scaled_rope": False}
_LLAMA3 = {"vocab_size": 128256, "n_kv_heads": 8, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": False}
_LLAMA31 = dict(_LLAMA3, use_scaled_rope=True)

# Meta's params.json for each model, by name. Use as ModelArgs(**transformer_configs[name]).
# Llama 2 entries spell out what the files leave implicit: vocab_size 32000 (files: -1), n_kv_heads, rope_theta.
transformer_configs: dict[str, dict] = {
    "Llama-2-7B": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim_multiplier=None),
    "Llama-2-13B": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim_multiplier=None),
    "Llama-2-70B": dict(
        _LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
    "Llama-3-8B": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3),
    "Llama-3-70B": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3),
    "Llama-3.1-8B": dict(_LLAMA31, dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3),
    "Llama-3.1-70B": dict(_LLAMA31, dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3),
    # The bf16 MP8 and FP8 releases (8 KV heads); the bf16 MP16 release stores each KV head twice (16).
    "Llama-3.1-405B": dict(
        _LLAMA31, dim=16384, n_layers=126, n_heads=128, multiple_of=4096, ffn_dim_multiplier=1.2
    ),
    "Llama-3.2-1B": dict(_LLAMA31, dim=2048, n_layers=16, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5),
    "Llama-3.2-3B": dict(_LLAMA31, dim=3072, n_layers=28, n_heads=24, multiple_of=256, ffn_dim_multiplier=1.0),
    # The bundled toy model (checkpoints/tiny, made by checkpoints/make_tiny.py): ~1M parameters.
    "tiny": {
        "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
        "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0, "use_scaled_rope": False,
    },
}

