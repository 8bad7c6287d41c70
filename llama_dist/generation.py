"""Text generation across tensor-parallel ranks: Llama.build, generate, completions, streaming.

Rank 0 owns every request: it checks and broadcasts the prompts, receives the last position's logits,
samples, and broadcasts the chosen tokens. Every rank therefore holds identical tokens and stops at the
same step, whatever its own random state.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from llama_dist.chat import Dialog, format_dialog
from llama_dist.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, resolve_dtype
from llama_dist.distributed import (
    DistContext,
    RemoteRankError,
    checked_on_all_ranks,
    init_distributed,
    on_main_then_share,
    print0,
)
from llama_dist.engine import DecodeStep
from llama_dist.errors import CheckpointError, ConfigError, PromptTooLongError, RequestError
from llama_dist.formats import find_tokenizer
from llama_dist.formats.checklist import verify_checklist
from llama_dist.launch_env import local_world_size
from llama_dist.loading import load_model, open_checkpoint
from llama_dist.model import Transformer
from llama_dist.parallel import broadcast_from_rank0
from llama_dist.quant import DEFAULT_INT4_GROUP_SIZE, QuantizedWeight, QuantScheme, make_scheme
from llama_dist.sampling import check_sampling, sample_next
from llama_dist.tokenizer import TokenizerInterface, load_tokenizer


# What rank 0 broadcasts in place of a token when the logits it sampled from were not finite, and when its own
# sampling failed. Either is outside every rank's vocabulary slice, so a step that still feeds it on embeds zeros.
NO_TOKEN = -1
ABORTED = -2
# On CUDA the host reads the stop and failure flags every this many steps (each read waits for the device); rows
# that ended in between decode on, and `_finish` cuts what follows their stop token.
CHECK_EVERY = 8


@dataclass
class StreamStep:
    """One decoding step: per sequence, the token it gained (None if none) and the text that token added. A last
    step with no tokens may follow, carrying text held back for a partial character the generation ended in."""

    tokens: list[int | None]
    texts: list[str]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


@dataclass
class _Request:
    prompts: list[list[int]]
    max_gen_len: int
    temperature: float
    top_p: float
    logprobs: bool
    stop_tokens: list[int]

    def past_output(self, row: int, pos: int, token: int) -> bool:
        """Whether generated `token` at position `pos` of sequence `row` falls outside its output: a stop token
        ends the output (and is not part of it), and so does max_gen_len."""
        return pos >= len(self.prompts[row]) + self.max_gen_len or token in self.stop_tokens


@dataclass
class _DecodeState:
    tokens: torch.Tensor  # (bsz, total_len), prompts then generated tokens
    in_prompt: torch.Tensor  # (bsz, total_len) bool: position holds a prompt token
    token_logprobs: torch.Tensor | None
    last_pos: int = 0
    stats: GenerationStats = field(default_factory=GenerationStats)


def _describe_quantization(model: Transformer) -> str:
    """", int8 weights" for a quantized model (for the load message), "" for a float one."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    kinds = sorted({type(m).__name__.removesuffix("Weight").lower() for m in quantized})
    return f", {'+'.join(kinds)} weights" if kinds else ""


class Llama:
    def __init__(self, model: Transformer, tokenizer: TokenizerInterface, dist_ctx: DistContext, seed: int = 1,
                 compile: bool | None = None):
        self.model = model
        self.decode_step = DecodeStep(model, compile)
        self.tokenizer = tokenizer
        self.dist = dist_ctx
        # Only rank 0 samples; its generator alone decides every sampled token.
        self.generator = torch.Generator(device=dist_ctx.device).manual_seed(seed)
        self.last_stats = GenerationStats()

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
    ) -> "Llama":
        """Load the tokenizer and this rank's slice of the model, on a process group started once.

        context: the `DistContext` of a group started with `init_distributed` (as the command line does);
        None starts the group here with backend/device/timeout_s (see `init_distributed`). Never both.
        tokenizer_path: None finds the tokenizer in or beside ckpt_dir (`formats.find_tokenizer`): a Meta
        `tokenizer.model` or a Hugging Face `tokenizer.json`, whose directory's chat template and eos_token_id
        then drive chat and stopping.
        timeout_s: how long a rank waits for the others before failing (default $LLAMA_DIST_TIMEOUT, else
        600 s); it must cover the slowest rank's loading (and hashing).
        verify_checksums: first check every file listed in ckpt_dir's checklist.chk against its md5. Each node
        hashes its own copy, the files shared out between its local ranks (LOCAL_RANK / LOCAL_WORLD_SIZE).
        Any error (missing or bad file, shapes the world size cannot split) is raised on every rank alike.
        quantize: None, "int8" (one scale per output channel) or "int4" (a scale and zero per group of
        int4_group_size = 32, 64 or 128 input values): each rank quantizes its slice of the matmul weights at load
        (llama_dist.quant); keep_output_precision keeps the output projection in `dtype`. A quantized checkpoint
        (`python -m llama_dist quantize`) loads quantized as saved.
        compile: decode through a compiled step (`engine.DecodeStep`; CUDA graphs on GPUs); None compiles on CUDA
        only. The first decode step then takes the compile time (printed once); prefill stays eager.
        """
        if context is None:
            context = init_distributed(backend=backend, device=device, timeout_s=timeout_s)
        elif (backend, device, timeout_s) != (None, None, None):
            raise ConfigError(
                "pass either context (a started process group) or backend/device/timeout_s to start one, not both"
            )
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

        tokenizer, model = checked_on_all_ranks(load)
        print0(
            f"Loaded {ckpt_dir} on {context.world_size} rank(s) ({context.backend}, {context.device.type}, "
            f"{str(dtype).removeprefix('torch.')}{_describe_quantization(model)}) "
            f"in {time.perf_counter() - start:.2f} s"
        )
        return Llama(model, tokenizer, context, seed, compile)

    # ---- requests -------------------------------------------------------------------------------------

    def _check_request(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs) -> _Request:
        args = self.model.args
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise RequestError(f"prompt_tokens must be a non-empty list of token-id lists, got {prompt_tokens!r:.80}")
        if len(prompt_tokens) > args.max_batch_size:
            raise RequestError(f"{len(prompt_tokens)} prompts exceed max_batch_size={args.max_batch_size}")
        prompts = []
        for i, prompt in enumerate(prompt_tokens):
            if not isinstance(prompt, (list, tuple)) or not prompt:
                raise RequestError(f"prompt {i} must be a non-empty list of token ids, got {prompt!r:.80}")
            if len(prompt) > args.max_seq_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(prompt)} tokens, more than max_seq_len={args.max_seq_len}"
                )
            for t in prompt:
                if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                    raise RequestError(f"prompt {i} holds {t!r} ({type(t).__name__}), which is not an integer token id")
                if not 0 <= t < args.vocab_size:
                    raise RequestError(f"prompt {i} holds token id {t} outside the vocabulary [0, {args.vocab_size})")
            prompts.append([int(t) for t in prompt])
        check_sampling(temperature, top_p, max_gen_len)
        return _Request(prompts, int(max_gen_len), float(temperature), float(top_p), bool(logprobs),
                        list(self.tokenizer.stop_tokens))

    def _share_request(self, *request_args) -> _Request:
        """Rank 0's request, checked there, on every rank (or rank 0's error raised on every rank)."""
        return on_main_then_share(self._check_request, *request_args)

    # ---- the decoding loop ------------------------------------------------------------------------------

    def _new_state(self, req: _Request) -> _DecodeState:
        """The token grid of one request: prompts padded to the longest, room for generation after them."""
        device, bsz = self.dist.device, len(req.prompts)
        lengths = torch.tensor([len(p) for p in req.prompts], device=device)
        # Generation is cut where the cache ends: prompt + max_gen_len beyond max_seq_len is truncated.
        total_len = min(self.model.args.max_seq_len, max(map(len, req.prompts)) + req.max_gen_len)
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for i, prompt in enumerate(req.prompts):
            tokens[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        in_prompt = torch.arange(total_len, device=device)[None, :] < lengths[:, None]
        state = _DecodeState(tokens, in_prompt, torch.zeros(bsz, total_len, device=device) if req.logprobs else None)
        state.stats.prompt_tokens = int(lengths.sum())
        return state

    @torch.inference_mode()  # torch applies it around each step of the generator, not across yields
    def _decode_steps(self, req: _Request, state: _DecodeState) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode one request, filling `state`; yields (position, tokens chosen there) per step.

        Prompts may differ in length: decoding starts after the shortest, and a position that still holds
        a longer prompt's token keeps it.
        """
        tokens, in_prompt, device, bsz = state.tokens, state.in_prompt, self.dist.device, len(req.prompts)
        min_len, total_len = min(map(len, req.prompts)), tokens.shape[1]
        if min_len == total_len:  # nothing to generate: only score the prompts
            out = self.model(tokens, 0, gather="rank0")
            if self.dist.is_main and req.logprobs:
                state.token_logprobs[:, 1:] = -F.cross_entropy(
                    out.logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none"
                )
            state.last_pos = total_len - 1
            return

        stop_tokens = torch.tensor(req.stop_tokens, device=device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        # Whether any step so far brought NO_TOKEN or ABORTED, read on the host only every CHECK_EVERY steps.
        trouble = torch.zeros(2, dtype=torch.bool, device=device)
        positions = torch.zeros(bsz, dtype=torch.long, device=device)
        check_every = 1 if device.type == "cpu" else CHECK_EVERY
        failure: BaseException | None = None  # rank 0's own error while sampling, raised once every rank knows
        started = time.perf_counter()
        prev_pos = 0
        for step, cur_pos in enumerate(range(min_len, total_len)):
            if prev_pos == 0:  # prefill: the shortest prompt, all rows at once
                out = self.model(tokens[:, :cur_pos], 0, last_only=not req.logprobs, gather="rank0")
                logits = out.logits
            else:
                positions.fill_(prev_pos)
                last = self.decode_step(tokens[:, prev_pos], positions, length=cur_pos)
                logits = None if last is None else last[:, None]
            next_tokens = torch.empty(bsz, dtype=torch.long, device=device)
            if self.dist.is_main:
                try:
                    self._choose(req, state, logits, prev_pos, cur_pos, next_tokens)
                except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, or they wait forever
                    failure = failure or exc
                if failure is not None:
                    next_tokens.fill_(ABORTED)
            broadcast_from_rank0(next_tokens)
            trouble |= torch.stack(((next_tokens == NO_TOKEN).any(), (next_tokens == ABORTED).any()))
            next_tokens = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_tokens)
            tokens[:, cur_pos] = next_tokens
            finished |= ~in_prompt[:, cur_pos] & torch.isin(next_tokens, stop_tokens)
            state.last_pos = cur_pos
            all_finished = False
            if step % check_every == 0 or cur_pos == total_len - 1:
                broken, aborted, all_finished = torch.cat((trouble, finished.all()[None])).tolist()  # a device sync
                if aborted:
                    if failure is not None:
                        raise failure
                    raise RemoteRankError(f"rank 0 failed while sampling position {cur_pos} (its error is on rank 0)")
                if broken:
                    raise CheckpointError(
                        f"the model produced non-finite logits (NaN or inf) at or before position {cur_pos}: its "
                        f"weights are broken, or they overflow in "
                        f"{str(self.model.tok_embeddings.weight.dtype).removeprefix('torch.')}"
                    )
            now = time.perf_counter()
            if prev_pos == 0:
                state.stats.prefill_s = now - started
            else:  # kept up to date each step: a consumer may stop iterating early (generate_stream does)
                state.stats.decode_steps += 1
                state.stats.decode_s = now - started - state.stats.prefill_s
            yield cur_pos, next_tokens
            prev_pos = cur_pos
            if all_finished:
                break

    def _choose(self, req: _Request, state: _DecodeState, logits, prev_pos: int, cur_pos: int, next_tokens) -> None:
        """Rank 0: sample position cur_pos from `logits` (bsz, positions prev_pos..cur_pos - 1, vocab) into
        next_tokens, and record the log-probabilities of the tokens at prev_pos + 1..cur_pos if asked."""
        last = logits[:, -1]
        sampled = sample_next(last, req.temperature, req.top_p, self.generator)
        # A row of non-finite logits sends NO_TOKEN instead, so every rank stops at the same check alike.
        next_tokens.copy_(torch.where(torch.isfinite(last).all(dim=-1), sampled, NO_TOKEN))
        if req.logprobs:
            targets = torch.where(state.in_prompt[:, cur_pos], state.tokens[:, cur_pos], next_tokens)
            targets = torch.cat((state.tokens[:, prev_pos + 1 : cur_pos], targets[:, None]), dim=1).clamp_min(0)
            state.token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                logits.transpose(1, 2), targets, reduction="none"
            )

    def _finish(self, req: _Request, state: _DecodeState, echo: bool):
        """Per sequence: (echoed prompt +) generated tokens up to the first stop token or max_gen_len."""
        logprobs = state.token_logprobs
        if logprobs is not None:
            broadcast_from_rank0(logprobs)
        out_tokens, out_logprobs = [], []
        rows = state.tokens[:, : state.last_pos + 1].tolist()
        for i, (prompt, row) in enumerate(zip(req.prompts, rows)):
            start, end = (0 if echo else len(prompt)), len(prompt)
            while end < len(row) and not req.past_output(i, end, row[end]):
                end += 1
            out_tokens.append(row[start:end])
            if logprobs is not None:
                out_logprobs.append(logprobs[i, start:end].tolist())
        generated_count = sum(len(t) - (0 if not echo else len(p)) for t, p in zip(out_tokens, req.prompts))
        state.stats.generated_tokens = generated_count
        self.last_stats = state.stats
        return out_tokens, (out_logprobs if logprobs is not None else None)

    # ---- public API -----------------------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate continuations of rank 0's `prompt_tokens` (other ranks may pass None).

        Returns (tokens, logprobs) per sequence, identical on every rank: the new tokens (after the prompt
        too with echo=True), cut at the first stop token (excluded) or max_gen_len; logprobs holds each
        returned token's log-probability when asked for, else None.

        Generation also ends where the KV cache does: a sequence gets at most max_seq_len - len(prompt) new
        tokens, so prompt + max_gen_len beyond max_seq_len is truncated there, not an error.

        A bad request (no prompts or more than max_batch_size, an empty prompt or one longer than
        max_seq_len, a token id outside [0, vocab_size), max_gen_len < 1, temperature < 0, top_p outside
        (0, 1]) raises RequestError on every rank before any work, and the Llama stays usable.
        """
        req = self._share_request(prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        state = self._new_state(req)
        for _ in self._decode_steps(req, state):
            pass
        return self._finish(req, state, echo)

    def generate_stream(
        self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6, top_p: float = 0.9
    ) -> Iterator[StreamStep]:
        """Like generate, but yields each step's new token and text per sequence as soon as it is chosen."""
        req = self._share_request(prompt_tokens, max_gen_len, temperature, top_p, False)
        generated: list[list[int]] = [[] for _ in req.prompts]
        shown = [""] * len(req.prompts)
        done = [False] * len(req.prompts)
        state = self._new_state(req)
        for cur_pos, next_tokens in self._decode_steps(req, state):
            step = StreamStep([None] * len(req.prompts), [""] * len(req.prompts))
            for i, tok in enumerate(next_tokens.tolist()):
                if done[i] or cur_pos < len(req.prompts[i]):
                    continue
                if req.past_output(i, cur_pos, tok):
                    done[i] = True
                    continue
                generated[i].append(tok)
                text = self.tokenizer.decode(generated[i])
                step.tokens[i] = tok
                # Hold back a partial UTF-8 character until the tokens that complete it arrive.
                if not text.endswith("\ufffd"):
                    step.texts[i], shown[i] = text[len(shown[i]) :], text
            yield step
            if all(done):
                break
        # Text held back for a partial character that never completed (the generation ended inside it).
        rest = [self.tokenizer.decode(ids)[len(seen):] if ids else "" for ids, seen in zip(generated, shown)]
        if any(rest):
            yield StreamStep([None] * len(req.prompts), rest)
        self._finish(req, state, echo=False)

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
        return self.model.args.max_seq_len - 1 if max_gen_len is None else max_gen_len

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
