"""What passes between the HTTP side (rank 0's event-loop thread) and the engine loop (rank 0's main thread).

The HTTP side checks and tokenizes a request, then `submit`s a `GenerationRequest` to the engine and reads the
returned `RequestHandle`'s events; the engine pushes one `TokenEvent` per generated token and ends with one
`Finished`. Either side may end a request early: the HTTP side with `handle.cancel()` (client gone, stop string
seen), after which the engine frees its slot at the next step and sends `Finished("cancelled")`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.errors import RequestError

_request_ids = itertools.count()


class ServerBusy(RequestError):
    """The waiting queue is full (HTTP 429)."""


class ServerStopping(ServerBusy):
    """The server is shutting down and takes no new request (HTTP 503)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate, checked by the HTTP side: ids in the vocabulary, len(prompt) + params.max_tokens
    within max_seq_len. params: the engine's SamplingParams, as the request asks them (checked when made): the
    tokenizer's stop tokens among stop_token_ids, logprobs for each TokenEvent's log-probability (and top_logprobs
    alternatives), prompt_logprobs for the handle's prompt scores (echo + logprobs), a seed or None (the engine's
    generator), a grammar or None."""

    prompt_tokens: list[int]
    params: SamplingParams
    same_prompt_as: int | None = None  # the id of another choice (n > 1) of the same prompt, submitted before
    id: int = field(default_factory=lambda: next(_request_ids))

    def another_choice(self, index: int) -> GenerationRequest:
        """Choice `index` (n > 1) of this request: its own id, seed + index when seeded, and the engine told it
        shares this one's prompt (computed once, then found in the prefix cache)."""
        seed = self.params.seed
        return dataclasses.replace(self, id=next(_request_ids), same_prompt_as=self.id,
                                   params=dataclasses.replace(self.params, seed=None if seed is None else seed + index))


@dataclass(frozen=True)
class TokenEvent:
    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class Finished:
    """The last event of a request. reason: "stop" (a stop token), "length" (max_tokens or the cache's end),
    "cancelled" (cancel() was called), "shutdown" (the server is stopping), "error" (the engine failed this request;
    `error` says why), "failed" (the server itself failed, e.g. lost a rank, and is stopping; `error` says why)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class RequestHandle:
    """The HTTP side's view of a submitted request. Made on the event loop that reads it; the engine thread
    pushes events with `push` (thread-safe)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.cached_tokens = 0  # prompt tokens the engine found in its prefix cache (set before the first event)
        # Each prompt token's log-probability (None for the first), when asked; set before the first event.
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # with top_logprobs

    def push(self, event: TokenEvent | Finished) -> None:
        """Called by the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self) -> AsyncIterator[TokenEvent | Finished]:
        """The request's events in order, ending with its Finished."""
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Finished):
                return
