"""Model hyperparameters (Meta's params.json fields) plus the runtime limits of one model instance."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A model configuration that cannot run (bad params.json, or a world size the shapes do not divide)."""


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

    # Runtime limits: they size the KV cache, so they are chosen per run, not read from params.json.
    max_batch_size: int = 4
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, scaled by ffn_dim_multiplier, rounded up to multiple_of (Meta's rule)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_params_json(cls, path: str | Path, **overrides) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"params.json not found: {path}")
        try:
            params = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(params, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(params).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        # Meta's files carry extra keys (e.g. quantization, vision fields) that do not shape a text model.
        args = cls(**{k: v for k, v in params.items() if k in known})
        for key, value in overrides.items():
            if key not in known:
                raise ConfigError(f"unknown model argument {key!r}")
            setattr(args, key, value)
        return args

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError when these shapes cannot run on `world_size` tensor-parallel ranks."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be positive (got {self.vocab_size}); read it from the checkpoint")
        if self.dim % self.n_heads:
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
