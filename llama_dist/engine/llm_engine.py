"""The one engine under offline generation, chat and the server.

    engine = LLMEngine(model, tokenizer, device, is_main)        # every rank
    engine.add_request("a", prompt_ids, SamplingParams(...))     # rank 0
    while engine.has_unfinished():                               # rank 0 decides; see `run_until_done`
        for out in engine.step(): ...                            # every rank calls step() alike

Rank 0 owns the requests: the Scheduler picks each step's chunks (decodes first, then prefill chunks, within the
token budget), the plan goes to every rank (step_plan.exchange), every rank's ModelRunner computes, and rank 0
samples every row in one pass (Sampler), appends the tokens, detokenizes, checks stops and reports
RequestOutputs. The other ranks only ever see plans, so they stay in step whatever rank 0 is asked. With
speculative decoding a decoding row also carries guessed tokens (prompt lookup, or the draft model's, planned as
sub-steps of their own: `draft.DraftModel`) and rank 0 keeps those the model agrees with (`speculative`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from llama_dist.dist.groups import RemoteRankError
from llama_dist.engine.block_manager import RESERVED_BLOCKS, BlockManager
from llama_dist.engine.draft import DraftModel
from llama_dist.engine.engine_config import EngineConfig, pool_tokens, pooled_cache
from llama_dist.engine.host_batch import HostBatch, logit_rows, to_host
from llama_dist.engine.metrics import EngineMetrics
from llama_dist.engine.model_runner import ModelRunner
from llama_dist.engine.sampler import Sampler, VerifiedRow, target_scores
from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.scheduler import ScheduledChunk, Scheduler
from llama_dist.engine.sequence import RequestOutput, Sequence
from llama_dist.engine.speculative import NgramProposer, SpeculativeConfig
from llama_dist.engine.step_plan import PlanKind, PlanRow, StepPlan, exchange
from llama_dist.engine.structured_output import GrammarCompiler
from llama_dist.errors import ConfigError, PromptTooLongError, RequestError
from llama_dist.model.llama import Transformer
from llama_dist.text.detokenizer import CompletionText
from llama_dist.text.tokenizer_interface import TokenizerInterface

NON_FINITE = "the model produced non-finite logits (NaN or inf): its weights are broken, or they overflow in {dtype}"


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: TokenizerInterface, device: torch.device, is_main: bool,
                 config: EngineConfig | None = None, *, seed: int = 1, compile: bool | None = None,
                 draft_model: Transformer | None = None):
        """draft_model: the guessing model of config.speculative's "draft" method (loaded on every rank alike)."""
        self.model, self.tokenizer, self.device, self.is_main = model, tokenizer, device, is_main
        config = EngineConfig() if config is None else config
        config.check()
        self.config, self.max_seq_len = config, model.max_seq_len
        self.max_num_seqs = model.max_batch_size if config.max_num_seqs is None else config.max_num_seqs
        block_size = config.block_size
        num_blocks = -(-pool_tokens(model, config, device) // block_size) + RESERVED_BLOCKS
        # The engine's pool; Meta's model(tokens, start_pos) uses its first blocks too.
        self.cache = pooled_cache(model, num_blocks, block_size)
        self.runner = ModelRunner(model, self.cache, compile)
        # On CPUs attention reads a run of consecutive blocks as one slice: sequences get runs when there is room.
        self.block_manager = BlockManager(num_blocks, block_size, config.prefix_caching,
                                          seek_runs=torch.device(device).type == "cpu")
        speculative = config.speculative
        if (speculative is not None and speculative.method == "draft") != (draft_model is not None):
            raise ConfigError("a draft model goes with speculative method 'draft', and that method needs one")
        self.draft = None if draft_model is None else DraftModel(draft_model, num_blocks, block_size)
        self.scheduler = Scheduler(self.max_num_seqs, config.max_num_batched_tokens, self.block_manager,
                                   self._proposer(speculative))
        self.sampler = Sampler(device, seed)
        # Structured output (rank 0): the grammar vocabulary is built on the first grammar's check.
        self.grammars = GrammarCompiler(tokenizer, model.args.vocab_size)
        self._any_token = torch.ones(model.args.vocab_size, dtype=torch.bool)  # the mask of a row with no grammar
        self.metrics = EngineMetrics()
        self._failure: BaseException | None = None  # rank 0's own error, raised once every rank knows

    @staticmethod
    def _proposer(config: SpeculativeConfig | None):
        """propose(seq, k) for the scheduler: prompt lookup over the sequence's tokens, or, with a draft model,
        placeholders for the guesses it makes once the step is scheduled (`DraftModel.propose`); at most
        config.num_tokens."""
        if config is None:
            return None
        if config.method == "draft":
            return lambda seq, k: [0] * min(k, config.num_tokens)
        lookup = NgramProposer(config.ngram_min, config.ngram_max)
        return lambda seq, k: lookup.propose(seq.token_ids(0, seq.num_tokens), min(k, config.num_tokens))

    # ---- requests (rank 0) ----------------------------------------------------------------------------------

    def add_request(self, request_id, prompt_token_ids: list[int], params: SamplingParams,
                    detokenize: bool = False, same_prompt_as=None) -> Sequence:
        """Queue a request (RequestError for a prompt that cannot run: empty, ids outside the vocabulary, longer
        than max_seq_len). Its outputs carry text deltas when it has stop strings or `detokenize`. same_prompt_as:
        the id of a request queued before with the same prompt (another choice of it, `n` > 1): this one starts
        once that one's prompt is computed, so that it finds the prompt's blocks in the prefix cache."""
        prompt = list(prompt_token_ids)
        vocab = self.model.args.vocab_size
        if not prompt:
            raise RequestError("the prompt is empty")
        if len(prompt) > self.max_seq_len:
            raise PromptTooLongError(f"the prompt has {len(prompt)} tokens, more than max_seq_len={self.max_seq_len}")
        if not all(0 <= t < vocab for t in prompt):
            raise RequestError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        if any(t >= vocab for t in params.logit_bias):
            raise RequestError(f"logit_bias names token ids outside the vocabulary [0, {vocab})")
        room = self.max_seq_len - len(prompt)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.check_fits(len(prompt), max_tokens)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.tokenizer.stop_tokens))
        guide = None if params.guided is None else self.grammars.guide(params.guided)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, prompt, params, frozenset(stops), max_tokens, generator, time.monotonic())
        seq.guide = guide
        seq.prompt_leader = None if same_prompt_as is None else self.scheduler.find(same_prompt_as)
        if params.stop or detokenize:
            # A completion continues its prompt's text: the last prompt tokens shape its first word's spacing.
            seq.text = CompletionText(self.tokenizer, params.stop, prompt[-4:])
        self.scheduler.add(seq)
        return seq

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """RequestError when a sequence of that many tokens could never be in the cache, even alone (it would wait
        for ever). Reads only constants: the HTTP side may call it from its own thread."""
        needed = self.block_manager.blocks_for(prompt_tokens + max_tokens)
        if needed > self.block_manager.num_usable_blocks:
            raise RequestError(
                f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}) need {needed} KV cache blocks of "
                f"{self.cache.block_size} tokens; the cache has {self.block_manager.num_usable_blocks} "
                "(raise --kv_cache_tokens, or ask for fewer tokens)")

    def abort(self, request_id) -> RequestOutput | None:
        """End a request in any state; its RequestOutput (finish reason "abort"), or None if it is not here."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, [], None, None)

    def abort_all(self) -> None:
        """End every request (rank 0): after a failure, nothing of the failed work stays queued."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- steps (every rank) ---------------------------------------------------------------------------------

    def step(self, when_idle: PlanKind = PlanKind.IDLE) -> tuple[PlanKind, list[RequestOutput]]:
        """One step on every rank: rank 0 plans (or, with nothing to do, sends `when_idle`), every rank computes,
        rank 0 samples. Returns the plan's kind and, on rank 0, what each request gained."""
        chunks: list[ScheduledChunk] = []
        plan = None
        if self.is_main:
            if self._failure is not None:
                plan = StepPlan(PlanKind.ABORT)
            else:
                chunks = self.scheduler.schedule()
                if self.draft is not None and chunks:
                    try:  # the draft's sub-steps: collective, the other ranks follow them below
                        self.draft.propose(chunks, self.sampler)
                    except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, or wait forever
                        self._failure, chunks = exc, []
                plan = (StepPlan(PlanKind.ABORT) if self._failure is not None
                        else self._plan(chunks) if chunks else StepPlan(when_idle))
        plan = exchange(plan)
        if self.draft is not None and not self.is_main:
            plan = self.draft.follow(plan)
        if plan.kind == PlanKind.ABORT:
            self.abort_all()
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            raise RemoteRankError("rank 0 failed during a step (its error is on rank 0)")
        if plan.kind != PlanKind.STEP:
            return plan.kind, []
        started = time.monotonic()
        logits = self.runner.execute(plan)
        if not self.is_main:
            return plan.kind, []
        try:
            outputs = self._postprocess(chunks, logits)
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it at the next step, or wait forever
            self._failure = exc
            return plan.kind, []
        self.metrics.step_done(chunks, time.monotonic() - started, self.scheduler)
        return plan.kind, outputs

    def warm_up(self) -> list[tuple[int, int]]:
        """Compile every shape the compiled decode step runs (each batch-size bucket with each context bucket); the
        (rows, context blocks) shapes warmed, none when eager. Collective: every rank calls it, before serving."""
        return self.runner.warm_up()

    def run_until_done(self) -> Iterator[list[RequestOutput]]:
        """Step on every rank until rank 0 has nothing unfinished (it then sends DONE); yields each step's outputs
        (empty on other ranks). Every rank must call it alike."""
        while True:
            kind, outputs = self.step(when_idle=PlanKind.DONE)
            if kind == PlanKind.DONE:
                return
            yield outputs

    def _plan(self, chunks: list[ScheduledChunk]) -> StepPlan:
        plan = StepPlan(PlanKind.STEP)
        for chunk in chunks:
            first = len(plan.token_ids)
            plan.rows.append(PlanRow(chunk.seq.block_table, chunk.start, chunk.num_tokens))
            plan.token_ids += chunk.seq.token_ids(chunk.start, chunk.start + chunk.num_tokens - len(chunk.draft))
            plan.token_ids += chunk.draft
            plan.logits_indices += [first + i for i in self._logit_positions(chunk)]
        return plan

    @staticmethod
    def _logit_positions(chunk: ScheduledChunk) -> range:
        """Which of the chunk's tokens rank 0 needs logits of: every prompt token's (prompt logprobs: each scores
        the next), or the last one's when the sequence's next token is sampled from it."""
        seq = chunk.seq
        if chunk.draft or (seq.params.prompt_logprobs and chunk.start < seq.num_prompt_tokens):
            return range(chunk.num_tokens)  # a speculative row: every guess is checked
        return range(chunk.num_tokens - 1, chunk.num_tokens) if chunk.completes_sequence else range(0)

    # ---- rank 0's bookkeeping -------------------------------------------------------------------------------

    def _postprocess(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample every sequence whose tokens are all cached now, score prompts, and report. One host sync."""
        row = 0
        sampled: list[tuple[ScheduledChunk, int]] = []  # (chunk, its logits row) of the sequences sampled now
        scored: list[tuple[ScheduledChunk, slice, list[int]]] = []  # prompt logprobs: rows and targets
        verified: list[tuple[ScheduledChunk, slice]] = []  # speculative rows
        for chunk in chunks:
            positions = self._logit_positions(chunk)
            rows = slice(row, row + len(positions))
            row += len(positions)
            seq = chunk.seq
            if chunk.draft:
                verified.append((chunk, rows))
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.publish(seq)  # its blocks filled this step become findable for later prompts
            if seq.params.prompt_logprobs and chunk.start < seq.num_prompt_tokens:
                # Position i scores token i + 1 while that is a prompt token; the sampled token is scored below.
                targets = seq.token_ids(chunk.start + 1, min(chunk.start + chunk.num_tokens + 1, seq.num_prompt_tokens))
                scored.append((chunk, slice(rows.start, rows.start + len(targets)), targets))
            if chunk.completes_sequence and len(seq.output_token_ids) < seq.max_tokens:
                sampled.append((chunk, rows.stop - 1))
        batch = None
        if sampled:
            allowed = None
            if any(c.seq.guide is not None for c, _ in sampled):  # grammars: rank 0 masks, the ranks never know
                allowed = torch.stack([c.seq.guide.allowed() if c.seq.guide is not None else self._any_token
                                       for c, _ in sampled]).to(logits.device)
            batch = self.sampler(logit_rows(logits, [r for _, r in sampled]), [c.seq.params for c, _ in sampled],
                                 [c.seq.generator for c, _ in sampled], allowed)
        host = to_host(batch, [target_scores(logits[rows], targets, c.seq.params.top_logprobs)
                                for c, rows, targets in scored if targets])
        for chunk, _, targets in scored:
            seq = chunk.seq
            if chunk.start == 0:  # the first prompt token: nothing before it to score it
                seq.prompt_logprobs.append(None)
                seq.prompt_top_logprobs.append(None)
            if targets:
                k = seq.params.top_logprobs
                for row in host.prompt_scores.pop(0):
                    seq.prompt_logprobs.append(row[0])
                    seq.prompt_top_logprobs.append([(int(i), lp) for i, lp in zip(row[1 : 1 + k], row[1 + k :])]
                                                   if k else None)
        outputs = {}
        for i, (chunk, _) in enumerate(sampled):
            outputs[chunk.seq.request_id] = self._append(chunk.seq, host, i)
        if verified:
            rows = self.sampler.verify([(logits[rows], list(chunk.draft), chunk.seq.params, chunk.seq.generator,
                                         chunk.draft_probs) for chunk, rows in verified])
            for (chunk, _), row in zip(verified, rows):
                outputs[chunk.seq.request_id] = self._verify(chunk, row)
        for chunk in chunks:  # a prompt scored to its end with nothing to generate (max_tokens 0)
            seq = chunk.seq
            if chunk.completes_sequence and not seq.is_finished and len(seq.output_token_ids) >= seq.max_tokens:
                self.scheduler.finish(seq, "length")
                outputs[seq.request_id] = self._output(seq, [], None, None)
        return list(outputs.values())

    def _verify(self, chunk: ScheduledChunk, row: VerifiedRow) -> RequestOutput:
        """A verified speculative row: the kept guesses and the model's own token after them. Count the kept
        guesses as computed, give back the blocks taken for the rest, and append the tokens one by one (a stop
        inside the run ends the output there)."""
        seq = chunk.seq
        self.metrics.speculated(len(chunk.draft), len(row.tokens) - 1)
        seq.num_computed_tokens += len(row.tokens)  # the newest token and the kept guesses (the last one is new)
        seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)  # its rejected guesses too
        if not row.finite:
            return self._append_token(seq, None, None, None)
        tokens, logprobs, tops, text = [], [], [], ""
        for i, token in enumerate(row.tokens):
            output = self._append_token(seq, token, row.logprobs[i] if row.logprobs else None,
                                        row.top[i] if row.top else None)
            tokens += output.new_token_ids
            logprobs += output.new_logprobs or []
            tops += output.new_top_logprobs or []
            text += output.text
            if seq.is_finished:
                break
        if not seq.is_finished:
            self.block_manager.publish(seq)
            self.block_manager.trim(seq)
        output.new_token_ids, output.new_logprobs, output.new_top_logprobs = tokens, logprobs or None, tops or None
        output.text = text
        return output

    def _append(self, seq: Sequence, host: HostBatch, i: int) -> RequestOutput:
        if not host.finite[i]:
            return self._append_token(seq, None, None, None)
        logprob = host.logprobs[i] if seq.params.logprobs or seq.params.top_logprobs else None
        top = host.top[i][: seq.params.top_logprobs] if seq.params.top_logprobs else None
        return self._append_token(seq, host.tokens[i], logprob, top)

    def _append_token(self, seq: Sequence, token: int | None, logprob: float | None, top) -> RequestOutput:
        """Add one generated token to `seq` (None: its logits were not finite), checking every way it may end."""
        now = time.monotonic()
        if token is None:
            dtype = str(self.model.tok_embeddings.weight.dtype).removeprefix("torch.")
            self.scheduler.finish(seq, "error", NON_FINITE.format(dtype=dtype))
            return self._output(seq, [], None, None)
        self.metrics.token_generated(seq, now)
        if token in seq.stop_token_ids:  # a stop token ends the output and is no part of it
            self.scheduler.finish(seq, "stop")
            return self._output(seq, [], None, None)
        seq.output_token_ids.append(token)
        if seq.guide is not None:
            try:
                seq.guide.consume(token)
            except RequestError as e:
                self.scheduler.finish(seq, "error", str(e))
                return self._output(seq, [token], None, None)
            if seq.guide.finished:  # the grammar is complete: nothing may follow
                self.scheduler.finish(seq, "stop")
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        if top is not None:
            seq.output_top_logprobs.append(top)
        if seq.text is not None:
            seq.text.add(token, logprob)
            if seq.text.stopped:  # a stop string: the text ends before it
                self.scheduler.finish(seq, "stop")
        if len(seq.output_token_ids) >= seq.max_tokens and not seq.is_finished:
            self.scheduler.finish(seq, "length")
        return self._output(seq, [token], logprob, top)

    def _output(self, seq: Sequence, tokens: list[int], logprob, top) -> RequestOutput:
        first = len(seq.output_token_ids) <= len(tokens)  # the request's first output carries its prompt's scores
        text = ""
        if seq.text is not None:
            if seq.is_finished:
                seq.text.end()
            text = seq.text.release()[0]
        return RequestOutput(
            seq.request_id, tokens,
            new_logprobs=[logprob] if logprob is not None else None,
            new_top_logprobs=[top] if top is not None else None,
            finished=seq.is_finished, finish_reason=seq.finish_reason, error=seq.error,
            prompt_logprobs=list(seq.prompt_logprobs) if first and seq.params.prompt_logprobs else None,
            prompt_top_logprobs=(list(seq.prompt_top_logprobs) if first and seq.params.prompt_logprobs
                                 and seq.params.top_logprobs else None),
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=len(seq.output_token_ids), text=text,
            num_cached_tokens=seq.num_cached_tokens,
        )
