"""Checkpoint formats. A format is a reader of named full-shape tensors (Meta's names) that the one loader
(`llama_dist.checkpoint.loader`) slices with each parameter's `ShardSpec`:

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

from llama_dist.checkpoint import hf
from llama_dist.checkpoint.consolidated import SHARD_PATTERN, ConsolidatedReader
from llama_dist.checkpoint.random_reader import RandomReader, is_random_checkpoint
from llama_dist.config import ModelArgs
from llama_dist.errors import CheckpointError
from llama_dist.model.parallel import ShardSpec
from llama_dist.model.quant import QuantScheme


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
    """The reader for the checkpoint at `path`, told by its files: a Meta directory (`consolidated.NN.pth` +
    `params.json`) or a single `.pth` file; a Hugging Face directory (`config.json` + `model.safetensors`, or
    `model.safetensors.index.json` and the files it lists). A directory holding both reads as Meta's.
    `random:NAME`: the random weights of a model preset, no files (`random_reader`)."""
    if is_random_checkpoint(path):
        return RandomReader(path)
    path = Path(path)
    if not path.is_dir() or any(SHARD_PATTERN.fullmatch(p.name) for p in path.iterdir()):
        return ConsolidatedReader(path)  # a file, a missing path, or Meta's shards: it names what is wrong
    if hf.is_hf_checkpoint(path):
        return hf.HuggingFaceReader(path)
    raise CheckpointError(
        f"{path} is not a checkpoint: it has neither Meta's consolidated.NN.pth shards (with params.json) nor "
        f"Hugging Face's {hf.CONFIG} with {hf.SINGLE_FILE} or {hf.INDEX}"
    )


def find_tokenizer(ckpt_dir: str | Path) -> Path:
    """The tokenizer of the checkpoint at `ckpt_dir`, looked for in the order its format keeps one:

    - a Hugging Face directory (config.json, no params.json): `tokenizer.json`, then `tokenizer.model` (Llama 2
      repositories ship the SentencePiece model too), then `original/tokenizer.model` (Meta's Llama 3
      repositories keep Meta's files there);
    - a Meta checkpoint: `tokenizer.model` inside the directory (Llama 3) or beside it (Llama 2), then a
      `tokenizer.json` inside it.
    """
    if is_random_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} (random weights) has no tokenizer: pass tokenizer_path (--tokenizer_path)")
    ckpt = Path(ckpt_dir)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    if (folder / "config.json").is_file() and not (folder / "params.json").is_file():
        candidates = [folder / "tokenizer.json", folder / "tokenizer.model", folder / "original" / "tokenizer.model"]
    else:
        candidates = [folder / "tokenizer.model", folder.parent / "tokenizer.model", folder / "tokenizer.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no tokenizer for {ckpt}: looked for {', '.join(str(c) for c in candidates)}; "
        "pass tokenizer_path (--tokenizer_path)"
    )
