"""The `Llama` facade: load a checkpoint on every rank, then complete text and chat (Meta's API).

    llm = Llama.build("checkpoints/tiny")
    llm.text_completion(["one two three"], temperature=0)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch

from llama_dist.checkpoint.checklist import verify_checklist
from llama_dist.checkpoint.formats import find_tokenizer
from llama_dist.checkpoint.loader import load_model, open_checkpoint
from llama_dist.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, resolve_dtype
from llama_dist.dist.groups import DistContext, checked_on_all_ranks, init_distributed, on_main_then_share, print0
from llama_dist.dist.launch_env import local_world_size
from llama_dist.engine.generation import GenerationStats, Generator, StreamStep
from llama_dist.engine.engine_config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig
from llama_dist.engine.speculative import SpeculativeConfig
from llama_dist.errors import CheckpointError, ConfigError, RequestError
from llama_dist.model.kernel_choice import choose_kernels, resolve_mode
from llama_dist.model.llama import Transformer
from llama_dist.model.quant import DEFAULT_INT4_GROUP_SIZE, QuantizedWeight, QuantScheme, make_scheme
from llama_dist.text.chat import Dialog, format_dialog
from llama_dist.text.tokenizer import load_tokenizer

__all__ = ["Llama", "GenerationStats", "StreamStep"]


def _describe_quantization(model: Transformer) -> str:
    """", int8 weights" for a quantized model (for the load message), "" for a float one."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    kinds = sorted({type(m).__name__.removesuffix("Weight").lower() for m in quantized})
    return f", {'+'.join(kinds)} weights" if kinds else ""


class Llama(Generator):
    """A loaded model and its tokenizer on every rank: `generate` (token ids, from `Generator`), text and chat
    completions, streaming chat."""

    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 1,
        backend: str | None = None,
        timeout_s: float | None = None,
        verify_checksums: bool = False,
        context: DistContext | None = None,
        quantize: str | QuantScheme | None = None,
        int4_group_size: int = DEFAULT_INT4_GROUP_SIZE,
        keep_output_precision: bool = False,
        compile: bool | None = None,
        kernel_choice: str | None = None,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        kv_cache_tokens: int | None = None,
        gpu_memory_fraction: float | None = None,
        prefix_caching: bool = True,
        speculative: str | None = None,
        num_speculative_tokens: int = 4,
        ngram_max: int = 4,
        ngram_min: int = 2,
        draft_ckpt_dir: str | Path | None = None,
        draft_quantize: str | None = None,
    ) -> "Llama":
        """Load the tokenizer and this rank's slice of the model, on a process group started once.

        context: the `DistContext` of a group started with `init_distributed` (as the command line does);
        None starts the group here with backend/device/timeout_s (see `init_distributed`). Never both.
        tokenizer_path: None finds the tokenizer in or beside ckpt_dir (`checkpoint.formats.find_tokenizer`): a Meta
        `tokenizer.model` or a Hugging Face `tokenizer.json`, whose directory's chat template and eos_token_id
        then drive chat and stopping.
        timeout_s: how long a rank waits for the others before failing (default $LLAMA_DIST_TIMEOUT, else
        600 s); it must cover the slowest rank's loading (and hashing).
        verify_checksums: first check every file listed in ckpt_dir's checklist.chk against its md5. Each node
        hashes its own copy, the files shared out between its local ranks (LOCAL_RANK / LOCAL_WORLD_SIZE).
        Any error (missing or bad file, shapes the world size cannot split) is raised on every rank alike.
        quantize: None, "int8" (one scale per output channel) or "int4" (a scale and zero per group of
        int4_group_size = 32, 64 or 128 input values): each rank quantizes its slice of the matmul weights at load
        (llama_dist.model.quant); keep_output_precision keeps the output projection in `dtype`. A quantized checkpoint
        (`python -m llama_dist quantize`) loads quantized as saved.
        compile: decode through a compiled step (`engine.decode_step.DecodeStep`; CUDA graphs on GPUs); None compiles on CUDA
        only. The first decode step then takes the compile time (printed once); prefill stays eager.
        max_num_batched_tokens, block_size, kv_cache_tokens, gpu_memory_fraction, prefix_caching: the engine's
        limits (`engine.llm_engine.EngineConfig`): a step's token budget (running sequences decode first, prompts
        are prefilled in chunks filling the rest), the paged KV cache's block size and pool, prefix reuse.
        max_batch_size bounds the sequences running at once (vLLM's max_num_seqs), max_seq_len one sequence.
        kernel_choice: "measure" times the candidate matmul kernels of each weight shape on every rank at once
        (about 2 s at most, cached on disk for the next start: `model.kernel_choice`) and runs the fastest; "static"
        keeps the fixed rules; None: $LLAMA_DIST_KERNEL_CHOICE, else "measure". CPU only (CUDA keeps its rules).
        speculative: "ngram" guesses up to num_speculative_tokens tokens per step by prompt lookup (the sequence's
        last ngram_max down to ngram_min tokens found earlier in it), "draft" by a draft model (draft_ckpt_dir, a
        smaller model with the same vocabulary, or the model itself quantized with draft_quantize, e.g. "int4"),
        and verifies them in the same step (`engine.speculative`: greedy output unchanged, sampled output from the
        model's distribution); None: off.
        """
        if context is None:
            context = init_distributed(backend=backend, device=device, timeout_s=timeout_s)
        elif (backend, device, timeout_s) != (None, None, None):
            raise ConfigError(
                "pass either context (a started process group) or backend/device/timeout_s to start one, not both"
            )
        kernel_choice = resolve_mode(kernel_choice)  # bad values fail before anything loads
        if speculative is None and (draft_ckpt_dir is not None or draft_quantize is not None):
            raise ConfigError("--draft_ckpt_dir and --draft_quantize go with --speculative draft")
        engine = EngineConfig(max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                              kv_cache_tokens=kv_cache_tokens, gpu_memory_fraction=gpu_memory_fraction,
                              prefix_caching=prefix_caching,
                              speculative=None if speculative is None else SpeculativeConfig(
                                  str(speculative), num_speculative_tokens, ngram_max, ngram_min,
                                  None if draft_ckpt_dir is None else str(draft_ckpt_dir), draft_quantize))
        engine.check()
        torch.manual_seed(seed)
        dtype = resolve_dtype(dtype, context.device)
        start = time.perf_counter()

        if verify_checksums:
            # Every node may hold its own copy: the local ranks of each node split its files between them
            # (this assumes the launcher's local world size is right, i.e. the same on every node).
            checked_on_all_ranks(verify_checklist, ckpt_dir, part=context.local_rank, parts=local_world_size())
            print0(f"Verified the md5 sums in {ckpt_dir}/checklist.chk in {time.perf_counter() - start:.2f} s")

        def load():
            scheme = make_scheme(quantize, int4_group_size, keep_output_precision)
            # The checkpoint first: a wrong ckpt_dir must be reported as such, not as a tokenizer missing from it.
            checkpoint = open_checkpoint(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
            tokenizer_file = find_tokenizer(ckpt_dir) if tokenizer_path is None else tokenizer_path
            tokenizer = load_tokenizer(tokenizer_file)
            # Meta's tokenizers must match the vocabulary exactly; a Hugging Face one must fit in it (a padded
            # embedding is fine): see TokenizerInterface.vocab_mismatch.
            mismatch = tokenizer.vocab_mismatch(checkpoint.args.vocab_size)
            if mismatch is not None:
                raise CheckpointError(
                    f"tokenizer {tokenizer_file} {mismatch} but {ckpt_dir} has a vocabulary "
                    f"of {checkpoint.args.vocab_size}: they belong to different models"
                )
            return tokenizer, load_model(checkpoint, device=context.device, dtype=dtype, quantize=scheme)

        def load_draft(vocab_size: int):
            spec = engine.speculative
            if spec is None or spec.method != "draft":
                return None
            draft_dir = ckpt_dir if spec.draft_ckpt_dir is None else spec.draft_ckpt_dir
            checkpoint = open_checkpoint(draft_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
            if checkpoint.args.vocab_size != vocab_size:
                raise CheckpointError(f"the draft model {draft_dir} has a vocabulary of {checkpoint.args.vocab_size}, "
                                      f"the model {vocab_size}: a draft must share the model's tokenizer")
            scheme = make_scheme(spec.draft_quantize, int4_group_size, keep_output_precision)
            return load_model(checkpoint, device=context.device, dtype=dtype, quantize=scheme)

        tokenizer, model = checked_on_all_ranks(load)
        draft_model = checked_on_all_ranks(load_draft, model.args.vocab_size)
        print0(
            f"Loaded {ckpt_dir} on {context.world_size} rank(s) ({context.backend}, {context.device.type}, "
            f"{str(dtype).removeprefix('torch.')}{_describe_quantization(model)}) "
            f"in {time.perf_counter() - start:.2f} s"
        )
        choose_kernels(model, kernel_choice)  # collective: after loading, which must not be
        if draft_model is not None:
            print0(f"Draft model: {engine.speculative.draft_ckpt_dir or ckpt_dir}{_describe_quantization(draft_model)}")
        return Llama(model, tokenizer, context, seed, compile, engine, draft_model)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[dict]:
        """Complete rank 0's `prompts`; returns [{"generation": str, ("tokens", "logprobs")}] per prompt."""
        return self._complete(self._encode_prompts, prompts, lambda text: text, temperature, top_p, max_gen_len,
                              logprobs, echo)

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
    ) -> list[dict]:
        """Answer rank 0's `dialogs`; returns [{"generation": {"role": "assistant", "content": str}, ...}]."""
        return self._complete(self._encode_dialogs, dialogs, lambda text: {"role": "assistant", "content": text},
                              temperature, top_p, max_gen_len, logprobs, echo=False)

    def _complete(self, encode, inputs, wrap, temperature, top_p, max_gen_len, logprobs, echo) -> list[dict]:
        """Encode rank 0's `inputs`, generate, and return Meta's result dicts: the decoded text (wrapped), plus
        per-token pieces and logprobs if asked."""
        prompt_tokens = on_main_then_share(encode, inputs)
        max_gen_len = self._max_gen_len_or_all(max_gen_len)
        tokens, token_logprobs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        results = []
        for i, seq in enumerate(tokens):
            result = {"generation": wrap(self.tokenizer.decode(seq))}
            if token_logprobs is not None:
                result.update(tokens=[self.tokenizer.decode([x]) for x in seq], logprobs=token_logprobs[i])
            results.append(result)
        return results

    def chat_stream(
        self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int | None = None
    ) -> Iterator[str]:
        """The assistant's answer to rank 0's `dialog`, as text pieces while they are generated."""
        prompt_tokens = on_main_then_share(self._encode_dialogs, [dialog])
        max_gen_len = self._max_gen_len_or_all(max_gen_len)
        for step in self.generate_stream(prompt_tokens, max_gen_len, temperature, top_p):
            if step.texts[0]:
                yield step.texts[0]

    def _max_gen_len_or_all(self, max_gen_len: int | None) -> int:
        """None means: as much as the cache allows (Meta's default for completions)."""
        return self.model.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _encode_prompts(self, prompts) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]

    def _encode_dialogs(self, dialogs) -> list[list[int]]:
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise RequestError(
                f"dialogs must be a non-empty list of dialogs (each a list of {{'role', 'content'}} messages), "
                f"got {dialogs!r:.80}"
            )
        return [format_dialog(self.tokenizer, dialog) for dialog in dialogs]
