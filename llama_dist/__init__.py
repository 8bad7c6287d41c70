"""llama_dist: tensor-parallel inference for Meta Llama checkpoints on torchrun, SLURM or a single process."""

from llama_dist.config import ModelArgs
from llama_dist.generation import Llama
from llama_dist.loading import load_model, open_checkpoint
from llama_dist.model import Transformer, TransformerOutput

__all__ = ["Llama", "ModelArgs", "Transformer", "TransformerOutput", "load_model", "open_checkpoint"]
__version__ = "0.1.0"
