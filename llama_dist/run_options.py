"""The flags every command line command takes (`RunOptions`: which model, how the ranks run it, how it samples), and
`command`, which gives a command those flags besides its own."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass

from llama_dist.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN
from llama_dist.engine.engine_config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS
from llama_dist.engine.sampling_params import check_sampling
from llama_dist.errors import ConfigError
from llama_dist.model.quant import DEFAULT_INT4_GROUP_SIZE

__all__ = ["RunOptions", "command"]


@dataclass(frozen=True)
class RunOptions:
    """The flags every command takes: which model, how the ranks run it, how it samples."""

    ckpt_dir: str | None = None
    tokenizer_path: str | None = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_num_seqs: int | None = None  # vLLM's name for max_batch_size
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_tokens: int | None = None
    gpu_memory_fraction: float | None = None
    prefix_caching: bool = True
    dtype: str | None = None
    seed: int = 1
    verify_checksums: bool = False
    timeout_s: float | None = None
    max_gen_len: int | None = None
    temperature: float = 0.6
    top_p: float = 0.9
    quantize: str | None = None
    int4_group_size: int = DEFAULT_INT4_GROUP_SIZE
    keep_output_precision: bool = False
    compile: bool | None = None
    kernel_choice: str | None = None
    speculative: str | None = None
    num_speculative_tokens: int = 4
    ngram_max: int = 4
    ngram_min: int = 2
    draft_ckpt_dir: str | None = None
    draft_quantize: str | None = None

    def __post_init__(self):
        """Refuse a flag of the wrong kind before anything starts (fire passes `--seed abc` as the text "abc" and
        `--verify_checksums false` as the truthy text "false"); values are checked where they are used."""
        for spec in dataclasses.fields(self):
            value, kind = getattr(self, spec.name), str(spec.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                continue
            if not ok:
                expected = {"b": "True or False (or --flag / --noflag)", "i": "an integer", "f": "a number"}[kind[0]]
                raise ConfigError(f"--{spec.name} must be {expected}, got {value!r}")
        check_sampling(self.temperature, self.top_p, self.max_gen_len)
        if self.max_num_seqs is not None:  # vLLM's name: the one limit is max_batch_size
            object.__setattr__(self, "max_batch_size", self.max_num_seqs)

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, max_gen_len=self.max_gen_len)


# Continues the "Args:" section of each command's docstring, which fire shows under each flag.
RUN_OPTIONS_HELP = """\
        ckpt_dir: a Meta or Hugging Face checkpoint directory (default: the bundled tiny model)
        tokenizer_path: default: the tokenizer.model or tokenizer.json in or beside the checkpoint directory
        max_seq_len: positions per sequence, prompt + generation; generation is cut where it ends
        max_batch_size: sequences running at once (the KV cache holds this many of max_seq_len positions)
        max_num_seqs: the same as --max_batch_size (vLLM's name); it wins when both are given
        max_num_batched_tokens: tokens computed in one step: running sequences decode first, prompts are
            prefilled in chunks filling the rest (smaller: shorter stalls of the running streams while a long
            prompt is admitted; larger: faster prefill)
        block_size: tokens per block of the paged KV cache
        kv_cache_tokens: tokens each rank's KV cache holds, shared by all running sequences (default: max_batch_size x
            max_seq_len); when they need more, the newest running sequence waits and is recomputed later
        gpu_memory_fraction: instead of --kv_cache_tokens on GPUs: the share of the GPU's memory the weights and the
            KV cache may take
        prefix_caching: reuse the cached KV blocks of earlier prompts that start alike (--noprefix_caching: off)
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)
        seed: rank 0's sampling seed
        verify_checksums: check the files against the checkpoint's checklist.chk (md5) before loading
        timeout_s: seconds a rank waits in a collective for its peers before the job fails (default:
            $LLAMA_DIST_TIMEOUT, else 600); it must cover the slowest rank's loading
        max_gen_len: tokens to generate at most (default: until a stop token or max_seq_len)
        temperature: 0 is greedy decoding
        top_p: nucleus sampling: sample among the most likely tokens that make up this probability mass
        quantize: int8 or int4: weight-only quantization of the matmul weights, each rank its own slice at load
            (a checkpoint saved by `llama-dist quantize` loads quantized without it)
        int4_group_size: input values per int4 scale and zero: 32, 64 or 128
        keep_output_precision: keep the output projection in the model dtype when quantizing
        compile: decode through a compiled step (CUDA graphs on GPUs): --compile / --nocompile (default: on CUDA
            only; the first decode step takes the compile time)
        kernel_choice: measure or static: time the matmul kernels of each weight shape at start (CPU, about 2 s
            at most, cached in $LLAMA_DIST_CACHE or ~/.cache/llama_dist for the next start) and run the fastest, or
            keep the fixed rules (default: $LLAMA_DIST_KERNEL_CHOICE, else measure)
        speculative: ngram or draft: speculative decoding: each step guesses a sequence's next tokens (ngram: from
            where its last tokens occurred earlier in it; draft: with a draft model) and checks them all at once
            (greedy output unchanged; sampled output keeps the model's distribution); default off
        num_speculative_tokens: tokens guessed per step at most (with --speculative)
        ngram_max: the longest run of last tokens looked up (with --speculative ngram)
        ngram_min: the shortest run of last tokens looked up (with --speculative ngram)
        draft_ckpt_dir: with --speculative draft: a smaller model with the same tokenizer that guesses
        draft_quantize: with --speculative draft: int4 or int8: the guesser is this model itself, quantized (a
            draft every user has; with --draft_ckpt_dir, that model quantized)
"""


def command(fn):
    """`fn(own flags..., options)` as a fire command taking its own flags and every RunOptions field as flags."""
    own = [p for name, p in inspect.signature(fn).parameters.items() if name != "options"]
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=f.type)
        for f in dataclasses.fields(RunOptions)
    ]
    signature = inspect.Signature(own + shared)
    own_names = {p.name for p in own}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        flags = {name: _as_text(name, value, signature.parameters[name]) for name, value in bound.arguments.items()}
        options = RunOptions(**{k: v for k, v in flags.items() if k not in own_names})
        return fn(**{k: v for k, v in flags.items() if k in own_names}, options=options)

    run.__signature__ = signature  # what fire reads to list and parse the flags
    run.__doc__ = f"{fn.__doc__.rstrip()}\n{RUN_OPTIONS_HELP}"
    return run


def _as_text(name: str, value, parameter: inspect.Parameter):
    """A text flag (a path, a prompt) as str: fire parses `--ckpt_dir 7` as an int, and a flag given without a
    value as True, which must not become the path or the prompt "True"."""
    if "str" not in str(parameter.annotation) or value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"--{name} needs a value")
    return str(value)
