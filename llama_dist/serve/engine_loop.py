"""The loop every rank runs while serving: the one engine (`engine.llm_engine.LLMEngine`) stepped continuously,
fed by the HTTP side on rank 0.

The HTTP side (rank 0's event-loop thread) `submit`s checked requests into an inbox; the loop (rank 0's main
thread) moves them into the engine, aborts those whose clients left, steps, and pushes each request's new tokens
and its end to its handle. The engine schedules (decodes first, prompts prefilled in chunks beside them), so a long
prompt never stalls the running streams. The other ranks run the same steps from rank 0's plans; an idle rank 0
still sends a heartbeat plan every HEARTBEAT_S, so their waits stay within the group timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from llama_dist.dist.groups import lost_contact
from llama_dist.engine.sequence import RequestOutput
from llama_dist.engine.step_plan import PlanKind
from llama_dist.errors import RequestError, one_line
from llama_dist.serve.requests import (
    Finished,
    GenerationRequest,
    RequestHandle,
    ServerBusy,
    ServerStopping,
    TokenEvent,
)

DEFAULT_MAX_QUEUE = 64
# An idle rank 0 still sends an empty plan this often, so the other ranks' waits stay within the group timeout
# and a lost rank is noticed while idle too.
HEARTBEAT_S = 1.0
# After a shutdown request, running requests get this long to finish before they are ended.
DRAIN_S = 5.0
# /health fails when work is pending and the engine has not finished a step for this long (a step of a big model
# on a CPU takes seconds; a first compiled step on a GPU, a minute or so).
STALL_S = 180.0

# The engine's finish reasons as the HTTP side names them.
_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled", "error": "error"}


@dataclass
class _Counters:
    served: int = 0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)


class ServingEngine:
    """The server's side of a built `Llama`'s engine. Every rank calls `run()`; on rank 0 the HTTP side calls
    `submit`, `health` and the attributes below from its own thread, and a signal handler may call
    `request_shutdown`."""

    def __init__(self, llm, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE, seed: int = 1):
        self.engine = llm.engine
        self.metrics = self.engine.metrics
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.max_seq_len = self.engine.max_seq_len
        self.max_batch_size = self.engine.max_num_seqs
        self.vocab_size = llm.model.args.vocab_size
        self.max_queue = max_queue
        self._is_main = llm.dist.is_main
        self._lock = threading.Condition()
        self._inbox: list[RequestHandle] = []  # submitted, not yet in the engine
        self._handles: dict[int, RequestHandle] = {}  # in the engine (loop thread only)
        self._waiting = 0  # in the engine but not running yet, as of the last step
        self._running = 0
        self._last_step_at = time.monotonic()  # when the engine last finished a step (or was idle)
        self._stopping_since: float | None = None
        self._failure: str | None = None  # why the loop ended by an error (every request is refused since)
        self._counters = _Counters()

    # ---- the HTTP side (rank 0) ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a checked request; call it on the event loop that will read the handle's events."""
        if not request.prompt_tokens or len(request.prompt_tokens) + request.params.max_tokens > self.max_seq_len:
            raise RequestError(
                f"the prompt ({len(request.prompt_tokens)} tokens) plus max_tokens ({request.params.max_tokens}) must fit "
                f"in max_seq_len={self.max_seq_len}"
            )
        self.engine.check_fits(len(request.prompt_tokens), request.params.max_tokens)
        handle = RequestHandle(request, asyncio.get_running_loop())
        with self._lock:
            if self._failure is not None:
                raise ServerStopping(f"the server is stopping: {self._failure}")
            if self._stopping_since is not None:
                raise ServerStopping("the server is shutting down")
            # Only what cannot be placed now queues: requests that free slots will take at the next step do not.
            queued = len(self._inbox) + self._waiting - max(0, self.max_batch_size - self._running)
            if queued >= self.max_queue:
                raise ServerBusy(f"{queued} requests are waiting already (the queue holds {self.max_queue}); retry later")
            self._inbox.append(handle)
            self._lock.notify()
        return handle

    def check_grammar(self, grammar) -> None:
        """RequestError when the grammar cannot be used. The HTTP side calls it on a worker thread: the first call
        builds the grammar vocabulary (about a second), each new grammar is compiled once."""
        self.engine.grammars.check(grammar)

    def health(self) -> dict:
        with self._lock:
            pending = self._running + self._waiting + len(self._inbox)
            stalled = pending and time.monotonic() - self._last_step_at > STALL_S
            status = ("failed" if self._failure is not None else "stopping" if self._stopping_since is not None
                      else "stalled" if stalled else "ok")
            return {
                "status": status,
                "running": self._running,
                "waiting": self._waiting + len(self._inbox),
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
        """Serve until rank 0 plans a shutdown. Collective: every rank calls it. When the loop fails (a rank is
        lost, an interrupt), rank 0 ends every open request with an error first, then the error propagates."""
        try:
            self._serve()
        except BaseException as exc:
            if self._is_main:
                self._end_every_request(exc)
            raise

    def _serve(self) -> None:
        while True:
            when_idle = self._prepare() if self._is_main else PlanKind.IDLE
            kind, outputs = self.engine.step(when_idle)
            if kind == PlanKind.SHUTDOWN:
                return
            if self._is_main:
                self._counters.steps += kind == PlanKind.STEP
                for output in outputs:
                    self._deliver(output)
                with self._lock:
                    self._waiting = len(self.engine.scheduler.waiting)
                    self._running = len(self.engine.scheduler.running)
                    self._last_step_at = time.monotonic()

    def _end_every_request(self, exc: BaseException) -> None:
        """Finish every open request with reason "failed" (streams get an error event, the others a 503)."""
        if lost_contact(exc):
            why = "it lost contact with one of its ranks"
        elif isinstance(exc, KeyboardInterrupt):
            why = "it was interrupted"
        else:
            why = f"its engine failed ({one_line(exc, first=True)})"
        with self._lock:
            self._failure = why
            inbox, self._inbox = self._inbox, []
        for handle in [*inbox, *self._handles.values()]:
            handle.push(Finished("failed", len(handle.request.prompt_tokens), 0, f"the server is stopping: {why}"))
        self._handles.clear()

    # ---- rank 0's side of the loop ------------------------------------------------------------------------

    def _prepare(self) -> PlanKind:
        """Before a step: take in new requests, end cancelled ones, wait while idle; what an idle step sends."""
        with self._lock:
            if not self._inbox and not self.engine.has_unfinished() and self._stopping_since is None:
                self._lock.wait(timeout=HEARTBEAT_S)
            inbox, self._inbox = self._inbox, []
        for handle in inbox:
            self._admit(handle)
        for request_id, handle in list(self._handles.items()):
            if handle.cancelled:
                output = self.engine.abort(request_id)
                if output is not None:
                    self._deliver(output)
        if self._stopping_since is None:
            return PlanKind.IDLE
        # Shutting down: what has not started ends now; what runs gets DRAIN_S to finish.
        drained = time.monotonic() - self._stopping_since >= DRAIN_S
        for seq in [*self.engine.scheduler.waiting, *(self.engine.scheduler.running if drained else [])]:
            self._deliver(self.engine.abort(seq.request_id), reason="shutdown")
        return PlanKind.SHUTDOWN  # sent once nothing runs any more

    def _admit(self, handle: RequestHandle) -> None:
        request = handle.request
        if self._stopping_since is not None or handle.cancelled:
            handle.push(Finished("cancelled" if handle.cancelled else "shutdown", len(request.prompt_tokens), 0))
            return
        try:
            self.engine.add_request(request.id, request.prompt_tokens, request.params,
                                    same_prompt_as=request.same_prompt_as)
        except RequestError as exc:  # checked at submit already; one request's error never ends the loop
            handle.push(Finished("error", len(request.prompt_tokens), 0, str(exc)))
            return
        self._handles[request.id] = handle

    def _deliver(self, output: RequestOutput, reason: str | None = None) -> None:
        """Push the output's tokens to its handle, and its end; `reason` overrides the engine's finish reason."""
        handle = self._handles.get(output.request_id)
        if handle is None:
            return
        handle.cached_tokens = output.num_cached_tokens
        if output.prompt_logprobs is not None:
            handle.prompt_logprobs = output.prompt_logprobs
            handle.prompt_top_logprobs = output.prompt_top_logprobs
        for i, token in enumerate(output.new_token_ids):
            top = tuple(output.new_top_logprobs[i]) if output.new_top_logprobs else None
            handle.push(TokenEvent(token, output.new_logprobs[i] if output.new_logprobs else None, top))
        if output.finished:
            del self._handles[output.request_id]
            self._counters.served += 1
            handle.push(Finished(reason or _REASONS[output.finish_reason], output.num_prompt_tokens,
                                 output.num_output_tokens, output.error))
