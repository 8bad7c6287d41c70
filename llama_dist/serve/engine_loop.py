"""Continuous batching over the tensor-parallel ranks: the loop every rank runs while serving.

The KV cache's max_batch_size rows are slots. A request takes a free slot, is prefilled there (with the other
requests admitted in the same step, as one right-padded batch), and from the next step on decodes with every
running request, each at its own position. A request that ends (stop token, max_tokens, the cache's end, its
client gone) frees its slot at once for the next in the queue.

Rank 0 decides each step and the other ranks follow: one object broadcast per step carries everything a step
is (which prompts to prefill into which slots, which slots decode which token at which position, or shut down),
so ranks cannot fall out of step whatever the HTTP side does. Only rank 0 samples, each request with its own
generator; the token it picks travels to the other ranks inside the next step's plan.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llama_dist.dist.groups import broadcast_object
from llama_dist.engine.sampling import sample_next
from llama_dist.errors import RequestError, one_line
from llama_dist.serve.requests import Finished, GenerationRequest, RequestHandle, ServerBusy, TokenEvent

DEFAULT_MAX_QUEUE = 64
# An idle rank 0 still sends an empty plan this often, so the other ranks' waits stay within the group timeout
# and a lost rank is noticed while idle too.
HEARTBEAT_S = 1.0
# Prompt tokens (padding included) prefilled in one step at most, beyond the first admitted prompt: bounds how long
# one step holds up the running requests' next tokens.
PREFILL_TOKEN_BUDGET = 2048
# After a shutdown request, running requests get this long to finish before they are ended.
DRAIN_S = 5.0


@dataclass(frozen=True)
class StepPlan:
    prefill: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (slot, prompt ids)
    decode: tuple[tuple[int, int, int], ...] = ()  # (slot, token, position)
    shutdown: bool = False


@dataclass
class _Running:
    """Rank 0's record of a request in a slot."""

    handle: RequestHandle
    slot: int
    generator: torch.Generator
    position: int = 0  # where `token` goes in the next decode step
    token: int | None = None
    generated: int = 0


@dataclass
class _Counters:
    served: int = 0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)


class ServingEngine:
    """The continuous-batching engine over a built `Llama`. Every rank calls `run()`; on rank 0 the HTTP side
    calls `submit`, `health` and the attributes below from its own thread, and a signal handler may call
    `request_shutdown`."""

    def __init__(self, llm, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE, seed: int = 1):
        self.llm, self.model = llm, llm.model
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.max_seq_len = self.model.args.max_seq_len
        self.max_batch_size = self.model.args.max_batch_size
        self.vocab_size = self.model.args.vocab_size
        self.max_queue = max_queue
        self._device = llm.dist.device
        self._is_main = llm.dist.is_main
        self._lock = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._slots: list[_Running | None] = [None] * self.max_batch_size
        self._stopping_since: float | None = None
        self._seeds = torch.Generator().manual_seed(seed)  # a seed for each request that brings none
        self._counters = _Counters()

    # ---- the HTTP side (rank 0) ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a checked request; call it on the event loop that will read the handle's events."""
        if not request.prompt_tokens or len(request.prompt_tokens) + request.max_tokens > self.max_seq_len:
            raise RequestError(
                f"the prompt ({len(request.prompt_tokens)} tokens) plus max_tokens ({request.max_tokens}) must fit "
                f"in max_seq_len={self.max_seq_len}"
            )
        handle = RequestHandle(request, asyncio.get_running_loop())
        with self._lock:
            if self._stopping_since is not None:
                raise ServerBusy("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise ServerBusy(
                    f"{len(self._waiting)} requests are waiting already (the queue holds {self.max_queue}); retry later"
                )
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def health(self) -> dict:
        with self._lock:
            return {
                "status": "stopping" if self._stopping_since is not None else "ok",
                "running": sum(run is not None for run in self._slots),
                "waiting": len(self._waiting),
                "slots": self.max_batch_size,
                "served": self._counters.served,
                "steps": self._counters.steps,
            }

    def request_shutdown(self) -> None:
        """Stop admitting requests, let the running ones finish (for up to DRAIN_S), then end every rank's loop.
        Safe from a signal handler: it only sets a flag (the loop polls it at least every HEARTBEAT_S)."""
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()

    # ---- the loop (every rank) ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until rank 0 plans a shutdown. Collective: every rank calls it."""
        while True:
            plan = broadcast_object(self._plan() if self._is_main else None)
            if plan.shutdown:
                return
            prefill_logits, decode_logits = self._execute(plan)
            if self._is_main:
                self._counters.steps += 1
                for (slot, prompt), logits in zip(plan.prefill, prefill_logits):
                    self._advance(self._slots[slot], logits, position=len(prompt))
                for (slot, _, position), logits in zip(plan.decode, decode_logits):
                    self._advance(self._slots[slot], logits, position=position + 1)

    @torch.inference_mode()
    def _execute(self, plan: StepPlan):
        """Run the plan's prefill and decode forwards; rank 0 gets their logits (one row a request)."""
        device = self._device
        prefill_logits = decode_logits = ()
        if plan.prefill:
            lengths = [len(prompt) for _, prompt in plan.prefill]
            tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
            for row, (_, prompt) in enumerate(plan.prefill):
                tokens[row, : len(prompt)] = torch.tensor(prompt)
            slots = torch.tensor([slot for slot, _ in plan.prefill], device=device)
            out = self.model(tokens.to(device), 0, gather="rank0", slots=slots,
                             logits_at=torch.tensor(lengths, device=device) - 1)
            prefill_logits = () if out.logits is None else out.logits[:, 0]
        if plan.decode:
            slots, tokens, positions = torch.tensor(plan.decode, device=device).unbind(1)
            logits = self.llm.decode_step(tokens, positions, length=max(p for *_, p in plan.decode) + 1,
                                          slots=slots)
            decode_logits = () if logits is None else logits
        return prefill_logits, decode_logits

    # ---- rank 0's decisions -------------------------------------------------------------------------------

    def _plan(self) -> StepPlan:
        with self._lock:
            if not self._waiting and not any(self._slots) and self._stopping_since is None:
                self._lock.wait(timeout=HEARTBEAT_S)
            for run in self._slots:
                if run is not None and run.handle.cancelled:
                    self._finish(run, "cancelled")
            if self._stopping_since is not None:
                return self._plan_shutdown()
            prefill = self._admit()
        return StepPlan(prefill=prefill, decode=self._decode_rows())

    def _decode_rows(self) -> tuple:
        """(slot, token, position) of every running request that has a token to feed (all but those admitted in
        this very step)."""
        return tuple((run.slot, run.token, run.position) for run in self._slots
                     if run is not None and run.token is not None)

    def _admit(self) -> tuple:
        """Move waiting requests into free slots, as many as fit the prefill budget (at least one)."""
        admitted, longest = [], 0
        free = [slot for slot, run in enumerate(self._slots) if run is None]
        while self._waiting and free:
            handle = self._waiting[0]
            if handle.cancelled:
                self._waiting.popleft()
                handle.push(Finished("cancelled", len(handle.request.prompt_tokens), 0))
                continue
            longest_then = max(longest, len(handle.request.prompt_tokens))
            if admitted and longest_then * (len(admitted) + 1) > PREFILL_TOKEN_BUDGET:
                break
            self._waiting.popleft()
            longest = longest_then
            slot = free.pop(0)
            seed = handle.request.seed
            if seed is None:
                seed = int(torch.randint(2**62, (1,), generator=self._seeds))
            generator = torch.Generator(device=self._device).manual_seed(seed)
            self._slots[slot] = _Running(handle, slot, generator)
            admitted.append((slot, tuple(handle.request.prompt_tokens)))
        return tuple(admitted)

    def _plan_shutdown(self) -> StepPlan:
        while self._waiting:
            handle = self._waiting.popleft()
            handle.push(Finished("error", len(handle.request.prompt_tokens), 0, "the server is shutting down"))
        running = [run for run in self._slots if run is not None]
        if running and time.monotonic() - self._stopping_since < DRAIN_S:
            return StepPlan(decode=self._decode_rows())
        for run in running:
            self._finish(run, "error", "the server is shutting down")
        return StepPlan(shutdown=True)

    def _advance(self, run: _Running, logits: torch.Tensor, position: int) -> None:
        """Sample `run`'s next token from `logits` (vocab,), which goes at `position`, and tell its client."""
        request = run.handle.request
        try:
            if not torch.isfinite(logits).all():
                raise RuntimeError("the model produced non-finite logits (NaN or inf)")
            token = int(sample_next(logits[None], request.temperature, request.top_p, run.generator))
            if token in request.stop_tokens:
                self._finish(run, "stop")
                return
            logprob = float(F.log_softmax(logits, dim=-1)[token]) if request.logprobs else None
            run.generated += 1
            run.token, run.position = token, position
            run.handle.push(TokenEvent(token, logprob))
            if run.generated >= request.max_tokens or position >= self.max_seq_len:
                self._finish(run, "length")
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the others, or the ranks
            self._finish(run, "error", one_line(exc))

    def _finish(self, run: _Running, reason: str, error: str | None = None) -> None:
        self._slots[run.slot] = None
        self._counters.served += 1
        run.handle.push(Finished(reason, len(run.handle.request.prompt_tokens), run.generated, error))
