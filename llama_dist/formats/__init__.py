"""Checkpoint formats. A format is a reader of named full-shape tensors (Meta's names) that the one loader
(`llama_dist.loading`) slices with each parameter's `ShardSpec`:

    reader.location                  the path it was opened from, for messages
    reader.config_path               where the format keeps the model's config (it may be absent)
    reader.stored_args()             ModelArgs stored with the weights, or None
    reader.stored_quantization()     the QuantScheme of a quantized checkpoint (its int8 weight `X` comes with
                                     per-row scales `X_scale`), None for a float one
    reader.vocab_size_from_weights() the vocabulary size the embedding's shape implies
    reader.check_world_size(n)       raise CheckpointError if the files cannot be split over n ranks
    reader.check_all_used(names)     raise CheckpointError if it holds tensors outside `names`
    reader.read(name, shape, spec)   the slice `spec` (None: all) of full tensor `name` of shape `shape`
    reader.release(name)             done with `name`: give back what reading it kept resident
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from llama_dist.config import ModelArgs
from llama_dist.formats.consolidated import ConsolidatedReader
from llama_dist.parallel import ShardSpec
from llama_dist.quant import QuantScheme


class CheckpointReader(Protocol):
    location: Path
    config_path: Path

    def stored_args(self) -> ModelArgs | None: ...

    def stored_quantization(self) -> QuantScheme | None: ...

    def vocab_size_from_weights(self) -> int: ...

    def check_world_size(self, world_size: int) -> None: ...

    def check_all_used(self, used: set[str]) -> None: ...

    def read(self, name: str, full_shape: tuple[int, ...], want: ShardSpec | None) -> torch.Tensor: ...

    def release(self, name: str) -> None: ...


def open_reader(path: str | Path) -> CheckpointReader:
    """The reader for the checkpoint at `path`: a Meta directory (`consolidated.NN.pth` + `params.json`) or a
    single `.pth` file."""
    return ConsolidatedReader(path)


def find_tokenizer(ckpt_dir: str | Path) -> Path:
    """The tokenizer of the checkpoint at `ckpt_dir`: Meta ships tokenizer.model inside the checkpoint directory
    (Llama 3) or beside it (Llama 2)."""
    ckpt = Path(ckpt_dir)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model in or beside {ckpt}: pass tokenizer_path (--tokenizer_path)")
