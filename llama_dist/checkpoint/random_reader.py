"""`random:NAME`, a checkpoint with no files: the random weights of the model preset NAME (`config.transformer_configs`,
e.g. random:Llama-3-8B, random:Llama-3.2-1B, random:tiny), drawn when read, where the model lives (this rank's GPU
when there is one, else the CPU), in bfloat16 as a release stores them.

Benchmarks and a GPU machine's checks load an 8B-shaped model in seconds with it, with nothing written to disk;
every command takes it as --ckpt_dir (a server or chat needs --tokenizer_path: there is no tokenizer). Each tensor
is drawn from a generator seeded by its name, so every reader of the same NAME on the same kind of device (ours,
transformers' through `FullTensors`) sees the same weights, and a rank's slice is the slice of the full tensor."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from llama_dist.config import ModelArgs, transformer_configs
from llama_dist.errors import CheckpointError
from llama_dist.model.parallel import ShardSpec
from llama_dist.model.weights import draw_weight, weight_shapes

PREFIX = "random:"
STORED_DTYPE = torch.bfloat16


def is_random_checkpoint(path) -> bool:
    return str(path).startswith(PREFIX)


class RandomReader:
    """A CheckpointReader (`formats`) drawing the weights of a model preset instead of reading files."""

    def __init__(self, path, seed: int = 0):
        name = str(path)[len(PREFIX):]
        if name not in transformer_configs:
            raise CheckpointError(f"{path}: no model preset {name!r} to draw random weights for; known: "
                                  f"{', '.join(transformer_configs)}")
        self.location = Path(str(path))
        self.config_path = self.location / "params.json"  # never a file: the config is the preset's
        self.args = ModelArgs(**transformer_configs[name])
        self.seed = seed
        self.shapes = weight_shapes(self.args)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
            torch.device("cpu"))

    def stored_args(self) -> ModelArgs:
        return self.args

    def stored_quantization(self) -> None:
        return None

    def vocab_size_from_weights(self) -> int:
        return self.args.vocab_size

    def check_world_size(self, world_size: int) -> None:
        pass  # drawn whole, sliced for any rank: the config's own divisibility is checked by the loader

    def check_all_used(self, used: set[str]) -> None:
        pass  # it holds exactly the tensors the preset's model has

    def read(self, name: str, full_shape: tuple[int, ...], want: ShardSpec | None) -> torch.Tensor:
        if name not in self.shapes:
            raise CheckpointError(f"{self.location} has no tensor {name!r}")
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        tensor = draw_weight(self.shapes[name], generator, self.device).to(STORED_DTYPE)
        if want is not None:
            tensor = tensor.narrow(want.dim, want.start, want.stop - want.start).contiguous()
        return tensor

    def release(self, name: str) -> None:
        pass
