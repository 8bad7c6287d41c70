"""Offline generation across tensor-parallel ranks: Meta's `generate` over a batch of token-id prompts, on the
one engine (`llm_engine.LLMEngine`) the server runs too.

Rank 0 owns every request: it checks the prompts, the engine schedules, samples and stops them; every rank runs
the same steps. Meta's semantics hold: ragged prompts, per-sequence stop tokens (not returned), `echo` with the
prompt's log-probabilities, output cut at max_gen_len or where max_seq_len ends, identical results on every rank.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Iterator

from llama_dist.dist.groups import DistContext, broadcast_object, on_main_then_share
from llama_dist.engine.llm_engine import EngineConfig, LLMEngine
from llama_dist.engine.sampling_params import SamplingParams, check_sampling
from llama_dist.engine.sequence import RequestOutput
from llama_dist.errors import CheckpointError, PromptTooLongError, RequestError
from llama_dist.model.llama import Transformer
from llama_dist.text.detokenizer import IncrementalDecoder
from llama_dist.text.tokenizer_interface import TokenizerInterface


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
    prefill_s: float = 0.0  # until every prompt is prefilled
    decode_s: float = 0.0  # the steps after that
    decode_steps: int = 0


@dataclass
class _Request:
    prompts: list[list[int]]
    max_gen_len: int
    temperature: float
    top_p: float
    logprobs: bool
    stop_tokens: list[int]


class Generator:
    """Generates continuations of token-id prompts with one model on every rank of its group."""

    def __init__(self, model: Transformer, tokenizer: TokenizerInterface, dist_ctx: DistContext, seed: int = 1,
                 compile: bool | None = None, engine_config: EngineConfig | None = None,
                 draft_model: Transformer | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.dist = dist_ctx
        # Only rank 0 samples: its engine's generator decides every token of a request without a seed.
        self.engine = LLMEngine(model, tokenizer, dist_ctx.device, dist_ctx.is_main, engine_config, seed=seed,
                                compile=compile, draft_model=draft_model)
        self.last_stats = GenerationStats()

    @property
    def decode_step(self):
        """The engine's decode step (eager or compiled)."""
        return self.engine.runner.decode_step

    # ---- requests -------------------------------------------------------------------------------------

    def _check_request(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs) -> _Request:
        model, args = self.model, self.model.args
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise RequestError(f"prompt_tokens must be a non-empty list of token-id lists, got {prompt_tokens!r:.80}")
        if len(prompt_tokens) > model.max_batch_size:
            raise RequestError(f"{len(prompt_tokens)} prompts exceed max_batch_size={model.max_batch_size}")
        prompts = []
        for i, prompt in enumerate(prompt_tokens):
            if not isinstance(prompt, (list, tuple)) or not prompt:
                raise RequestError(f"prompt {i} must be a non-empty list of token ids, got {prompt!r:.80}")
            if len(prompt) > model.max_seq_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(prompt)} tokens, more than max_seq_len={model.max_seq_len}"
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

    # ---- running the engine --------------------------------------------------------------------------------

    def _steps(self, req: _Request, echo: bool) -> Iterator[list[RequestOutput]]:
        """Add rank 0's request to the engine and step every rank until it is done; yields each step's outputs
        (rank 0's; empty elsewhere) and keeps `last_stats`."""
        if self.dist.is_main:
            for i, prompt in enumerate(req.prompts):
                params = SamplingParams(temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_gen_len,
                                        stop_token_ids=req.stop_tokens, ignore_eos=True, logprobs=req.logprobs,
                                        prompt_logprobs=req.logprobs and echo)
                self.engine.add_request(i, prompt, params)
        stats = GenerationStats(prompt_tokens=sum(map(len, req.prompts)))
        started = time.perf_counter()
        try:
            for outputs in self.engine.run_until_done():
                now = time.perf_counter()
                if self.engine.runner.last_step_prefilled:
                    stats.prefill_s = now - started
                else:
                    stats.decode_steps += 1
                    stats.decode_s = now - started - stats.prefill_s
                self.last_stats = stats
                yield outputs
        finally:  # a consumer that stops early, or an error: nothing of this request stays in the engine
            if self.dist.is_main:
                self.engine.abort_all()

    def _results(self, req: _Request, outputs: dict[int, list[RequestOutput]], echo: bool):
        """Rank 0: (tokens, logprobs) per prompt as Meta's generate returns them, or the first request's error."""
        tokens, logprobs = [], []
        for i, prompt in enumerate(req.prompts):
            steps = outputs.get(i, [])
            error = next((o.error for o in steps if o.error), None)
            if error is not None:
                raise CheckpointError(error)
            generated = [t for o in steps for t in o.new_token_ids]
            tokens.append((prompt if echo else []) + generated)
            if req.logprobs:
                scores = [lp for o in steps for lp in (o.new_logprobs or [])]
                prompt_scores = next((o.prompt_logprobs for o in steps if o.prompt_logprobs is not None), [])
                logprobs.append(([0.0 if lp is None else lp for lp in prompt_scores] if echo else []) + scores)
        return tokens, (logprobs if req.logprobs else None)

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
        collected: dict[int, list[RequestOutput]] = {}
        for outputs in self._steps(req, echo):
            for output in outputs:
                collected.setdefault(output.request_id, []).append(output)
        tokens, token_logprobs = on_main_then_share(self._results, req, collected, echo)
        self.last_stats.generated_tokens = sum(len(t) for t in tokens) - (sum(map(len, req.prompts)) if echo else 0)
        return tokens, token_logprobs

    def generate_stream(
        self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6, top_p: float = 0.9
    ) -> Iterator[StreamStep]:
        """Like generate, but yields each step's new token and text per sequence as soon as it is chosen (the
        same steps on every rank)."""
        req = self._share_request(prompt_tokens, max_gen_len, temperature, top_p, False)
        decoders = [IncrementalDecoder(self.tokenizer) for _ in req.prompts]
        collected: dict[int, list[RequestOutput]] = {}
        for outputs in self._steps(req, echo=False):
            outputs = broadcast_object(outputs if self.dist.is_main else None)  # every rank streams the same
            step = StreamStep([None] * len(req.prompts), [""] * len(req.prompts))
            for output in outputs:
                collected.setdefault(output.request_id, []).append(output)
                for token in output.new_token_ids:
                    step.tokens[output.request_id] = token
                    step.texts[output.request_id] += decoders[output.request_id].add(token)
            if any(t is not None for t in step.tokens):
                yield step
        tokens, _ = on_main_then_share(self._results, req, collected, False)  # an error is raised here, everywhere
        self.last_stats.generated_tokens = sum(len(t) for t in tokens)
        # Text held back for a partial character that never completed (the generation ended inside it).
        rest = [decoder.flush() for decoder in decoders]
        if any(rest):
            yield StreamStep([None] * len(req.prompts), rest)
