"""llama_dist: tensor-parallel inference for Meta Llama checkpoints on torchrun, SLURM or a single process.

    from llama_dist import Llama
    llm = Llama.build("checkpoints/tiny")                       # Meta's API: load, then complete text or chat
    llm.text_completion(["one two three"], temperature=0)

    from llama_dist import ModelArgs, Transformer, transformer_configs
    model = Transformer.from_pretrained("tiny", "checkpoints/tiny")   # the seed's (gpt-fast) API
"""

import os

# Large CPU tensors (>= 2 MiB: the weights, the KV cache) on transparent huge pages: a decode step streams every
# weight once, and with 4 KiB pages the TLB misses cost the compiled int8 kernel ~7% of a step (measured:
# docs/performance.md). torch reads this at its first CPU allocation, so it is set before torch is imported;
# THP_MEM_ALLOC_ENABLE=0 in the environment keeps the 4 KiB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from llama_dist.checkpoint.loader import load_model, open_checkpoint
from llama_dist.config import ModelArgs, transformer_configs
from llama_dist.dist.groups import init_distributed
from llama_dist.llm import Llama
from llama_dist.model.inspection import run_with_cache, to_str_tokens
from llama_dist.model.llama import Transformer, TransformerOutput
from llama_dist.text.chat import format_dialog
from llama_dist.text.tokenizer import SentencePieceWrapper, TiktokenWrapper, load_tokenizer
from llama_dist.text.tokenizer_interface import TokenizerInterface

__all__ = [
    "Llama", "Transformer", "TransformerOutput", "ModelArgs", "transformer_configs", "init_distributed", "load_model",
    "open_checkpoint", "load_tokenizer", "format_dialog", "SentencePieceWrapper", "TiktokenWrapper",
    "TokenizerInterface", "run_with_cache", "to_str_tokens",
]
__version__ = "0.1.0"
