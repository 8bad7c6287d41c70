"""Offline generation across tensor-parallel ranks: a batch of prompts decoded together to the end.

Rank 0 owns every request: it checks and broadcasts the prompts, receives the last position's logits,
samples, and broadcasts the chosen tokens. Every rank therefore holds identical tokens and stops at the
same step, whatever its own random state. `llama_dist.llm.Llama` adds loading, text and chat on top.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from llama_dist.dist.groups import DistContext, RemoteRankError, on_main_then_share
from llama_dist.engine.decode_step import DecodeStep
from llama_dist.engine.sampling import check_sampling, sample_next
from llama_dist.errors import CheckpointError, PromptTooLongError, RequestError
from llama_dist.model.llama import Transformer
from llama_dist.model.parallel import broadcast_from_rank0
from llama_dist.text.tokenizer_interface import TokenizerInterface

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


class Generator:
    """Generates continuations of token-id prompts with one model on every rank of its group."""

    def __init__(self, model: Transformer, tokenizer: TokenizerInterface, dist_ctx: DistContext, seed: int = 1,
                 compile: bool | None = None):
        self.model = model
        self.decode_step = DecodeStep(model, compile)
        self.tokenizer = tokenizer
        self.dist = dist_ctx
        # Only rank 0 samples; its generator alone decides every sampled token.
        self.generator = torch.Generator(device=dist_ctx.device).manual_seed(seed)
        self.last_stats = GenerationStats()


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
