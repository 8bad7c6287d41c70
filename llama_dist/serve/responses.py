"""From the engine's events to OpenAI's responses: the whole body, or a server-sent-event stream that ends its
request the moment its client leaves. `respond` submits a checked GenerationRequest and answers it; `TokenTexts`
spells alternative tokens as they read inside a text."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llama_dist.errors import RequestError
from llama_dist.serve.openai_schema import ApiError, CompletionRequest, CompletionShape
from llama_dist.serve.requests import (
    Finished,
    GenerationRequest,
    RequestHandle,
    ServerBusy,
    ServerStopping,
    TokenEvent,
)
from llama_dist.text.detokenizer import CompletionText, GeneratedToken

__all__ = ["DECODE_CONTEXT_TOKENS", "TokenTexts", "respond"]

# Prompt tokens a completion is decoded after (enough for any tokenizer to spell the first new word as it follows).
DECODE_CONTEXT_TOKENS = 4


class TokenTexts:
    """A token's text as it reads inside a text (an alternative in top_logprobs): decoded after an anchor token,
    since decoding a token alone drops the leading space of a SentencePiece word. Cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._anchor = tokenizer.encode("a", bos=False, eos=False)[-1:]
        self._anchor_text = tokenizer.decode(self._anchor)
        self._texts: dict[int, str] = {}

    def __getitem__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            both = self.tokenizer.decode(self._anchor + [token])
            text = both[len(self._anchor_text):] if both.startswith(self._anchor_text) else self.tokenizer.decode([token])
            if len(self._texts) < 1_000_000:
                self._texts[token] = text
        return text


# ---- reading the engine's events -----------------------------------------------------------------------------

class _Run:
    """A submitted request being read: its text so far, its token count, and why it ended."""

    def __init__(self, handle: RequestHandle, completion: CompletionText, token_texts: TokenTexts):
        self.handle, self.completion, self.token_texts = handle, completion, token_texts
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._engine_done = False

    async def pieces(self) -> AsyncIterator[tuple[str, list[GeneratedToken]]]:
        """The text that may be sent, piece by piece, and the tokens it completes; raises ApiError when the engine
        fails the request."""
        async for event in self.handle.events():
            if isinstance(event, TokenEvent):
                self.completion_tokens += 1
                self.completion.add(event.token, event.logprob, self.texts(event.top))
                if self.completion.stopped:
                    self.finish_reason = "stop"
                    self.stop_engine()  # the rest would be thrown away: give the slot to the next request
                    break
            elif isinstance(event, Finished):
                self._engine_done = True
                self.finish_reason = _finish_reason(event)
                self.completion.end()
                break
            text, tokens = self.completion.release()
            if self._worth_sending(text, tokens):
                yield text, tokens
        text, tokens = self.completion.release()
        if self._worth_sending(text, tokens):
            yield text, tokens

    def texts(self, top) -> list[tuple[str, float]] | None:
        """(token id, logprob) alternatives as (the token's own text, logprob)."""
        return None if top is None else [(self.token_texts[token], logprob) for token, logprob in top]

    def score_prompt(self, shape) -> None:
        """Give the echoed prompt its log-probabilities, once the engine has sent them (with the first event)."""
        if self.handle.request.params.prompt_logprobs and isinstance(shape, CompletionShape):
            top = self.handle.prompt_top_logprobs
            shape.score_prompt(self.handle.prompt_logprobs or [], top and [self.texts(t) for t in top])

    def _worth_sending(self, text: str, tokens: list[GeneratedToken]) -> bool:
        # Tokens that are part of a character not yet complete have no text: only their logprobs would go.
        return bool(text or (tokens and self.handle.request.params.logprobs))

    def stop_engine(self) -> None:
        if not self._engine_done:
            self.handle.cancel()
            self._engine_done = True


def _finish_reason(event: Finished) -> str:
    if event.reason in ("stop", "length"):
        return event.reason
    if event.reason in ("cancelled", "shutdown"):  # not by us (we stop reading once we cancel): shutting down
        raise ApiError("the server ended the request before it finished (shutting down)", 503, type="server_error",
                       code="shutting_down", headers={"Retry-After": "5"})
    if event.reason == "failed":  # the server is going down: another one may answer a retry
        raise ApiError(event.error or "the server failed", 503, type="server_error", code="server_failed")
    raise ApiError(f"generation failed: {event.error or event.reason}", 500, type="server_error")


async def respond(engine, request: Request, generation: GenerationRequest, body, shape,
                  token_texts: TokenTexts) -> Response:
    """Submit the request (and its other choices, n > 1) and answer it, whole or streamed."""
    generations = [generation] + [generation.another_choice(i) for i in range(1, body.n or 1)]
    # A text completion continues its prompt (prompt + text is the whole document, " Paris" after "... is"), while a
    # chat reply is a text of its own (no leading space before its first word, as Meta's chat_completion gives it).
    context = generation.prompt_tokens[-DECODE_CONTEXT_TOKENS:] if isinstance(body, CompletionRequest) else ()
    runs = []
    try:
        for choice in generations:
            completion = CompletionText(engine.tokenizer, body.stop_strings(), context)  # before submit: it may refuse
            runs.append(_Run(engine.submit(choice), completion, token_texts))
    except (ServerBusy, RequestError) as e:
        for run in runs:  # the choices submitted already: all of them or none
            run.stop_engine()
        if isinstance(e, ServerStopping):
            raise ApiError(str(e), 503, type="server_error", code="shutting_down",
                           headers={"Retry-After": "5"}) from None
        if isinstance(e, ServerBusy):
            raise ApiError(str(e) or "the server is busy", 429, type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        raise ApiError(str(e)) from None

    def stop_all() -> None:
        for run in runs:
            run.stop_engine()

    if body.stream:
        return _EventStream(_events(runs, shape, body.include_usage), on_close=stop_all)
    try:
        if not await _unless_disconnected(request, asyncio.gather(*(_read_all(run) for run in runs))):
            return Response(status_code=499)  # nobody reads it: the client is gone
    finally:
        stop_all()  # a no-op once the engine has finished
    runs[0].score_prompt(shape)
    choices = [(run.completion.text, run.completion.tokens, run.finish_reason) for run in runs]
    return JSONResponse(shape.response(choices, _usage(runs)))


def _usage(runs: list[_Run]) -> dict:
    """One prompt, however many choices: its tokens counted once."""
    prompt_tokens = len(runs[0].handle.request.prompt_tokens)
    completion_tokens = sum(run.completion_tokens for run in runs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": runs[0].handle.cached_tokens}}


async def _read_all(run: _Run) -> None:
    async for _ in run.pieces():
        pass


async def _unless_disconnected(request: Request, work) -> bool:
    """Run `work` to its end (True), unless the client disconnects first (False; `work` is cancelled)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task, watch_task = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((work_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            work_task.result()  # raises what the work raised
            return True
        return False
    finally:
        work_task.cancel()
        watch_task.cancel()


async def _merged(runs: list[_Run]) -> AsyncIterator[tuple[int, str | None, list[GeneratedToken]]]:
    """(choice, text, tokens) of every run as they come, and (choice, None, []) when one ends."""
    if len(runs) == 1:  # the common case, without tasks
        async for text, tokens in runs[0].pieces():
            yield 0, text, tokens
        yield 0, None, []
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, run: _Run) -> None:
        try:
            async for text, tokens in run.pieces():
                await queue.put((index, text, tokens, None))
            await queue.put((index, None, [], None))
        except ApiError as e:
            await queue.put((index, None, [], e))

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        for _ in range(len(runs)):
            while True:
                index, text, tokens, error = await queue.get()
                if error is not None:
                    raise error
                yield index, text, tokens
                if text is None:
                    break
    finally:
        for task in tasks:
            task.cancel()


async def _events(runs: list[_Run], shape, include_usage: bool) -> AsyncIterator[str]:
    # An echoed prompt with its log-probabilities opens each choice only with the engine's first event, which brings
    # the prompt's scores; otherwise every choice opens at once.
    waits_for_scores = runs[0].handle.request.params.prompt_logprobs
    opened = [not waits_for_scores] * len(runs)
    try:
        try:
            for index in range(len(runs) if not waits_for_scores else 0):
                for chunk in shape.opening_chunks(index):
                    yield _sse(chunk)
            async for index, text, tokens in _merged(runs):
                if not opened[index]:
                    runs[index].score_prompt(shape)
                    opened[index] = True
                    for chunk in shape.opening_chunks(index):
                        yield _sse(chunk)
                chunk = (shape.chunk("", [], runs[index].finish_reason, index) if text is None
                         else shape.chunk(text, tokens, None, index))
                if chunk is not None:  # None: held back (it may be a tool call)
                    yield _sse(chunk)
            if include_usage:
                yield _sse(shape.usage_chunk(_usage(runs)))
        except ApiError as e:  # the status line is sent: the error travels as an event
            yield _sse(e.body())
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects (the generator is closed or cancelled)
        for run in runs:
            run.stop_engine()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that call `on_close` as soon as the response ends, however it ends (a client that went
    away included), so its request frees the engine slot at once rather than when the generator is
    garbage-collected, or never when the client left before the generator started."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self._on_close()  # first: the awaits below may be cancelled
            await self.body_iterator.aclose()
