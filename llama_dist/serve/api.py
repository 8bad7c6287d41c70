"""The OpenAI-compatible HTTP API on rank 0: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics,
/tokenize and /detokenize (vLLM's shapes). With an API key, every route but /health and /metrics wants it.

A route checks and tokenizes the request, submits it to the engine, and turns the engine's token events into
OpenAI's response JSON or its server-sent-event stream. It runs on the HTTP thread's event loop and reaches the
engine only through `submit` and the returned handle. Templating, tokenizing and compiling grammars run on worker
threads, after the checks that bound their work (body size, text length, the template sandbox's limits): the event
loop keeps serving the other streams meanwhile, and, since they hold the GIL, the bounds keep them from slowing
the engine loop's thread for long.

What is used of `engine`: `submit(GenerationRequest) -> RequestHandle` (raising `ServerBusy` when its queue is
full), `tokenizer`, `vocab_size`, `max_seq_len`, `model_name`, `health() -> dict`, `metrics` (the engine's
EngineMetrics).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_dist.engine.sampling_params import SamplingParams
from llama_dist.engine.structured_output import Grammar
from llama_dist.errors import DialogError, RequestError, TokenizerError
from llama_dist.serve.http_server import DEFAULT_REQUEST_TIMEOUT_S
from llama_dist.serve.metrics import CONTENT_TYPE, ServerMetrics
from llama_dist.serve.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    unsupported_settings,
)
from llama_dist.serve.requests import GenerationRequest
from llama_dist.serve.responses import TokenTexts, respond
from llama_dist.serve.tools import call_grammar, checked_tools, chosen_tools, template_messages
from llama_dist.text.chat import format_dialog
from llama_dist.text.detokenizer import GeneratedToken, IncrementalDecoder

__all__ = ["make_app"]

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system
DEFAULT_MAX_REQUEST_MB = 4.0  # a request body larger than this gets 413, before it is parsed
# A text prompt longer than this many characters per position of max_seq_len cannot fit in any tokenizer's tokens:
# refused before tokenizing (which holds the GIL, and the engine loop is a thread of the same process).
MAX_CHARS_PER_TOKEN = 32
# Routes open without the API key: probes and scrapers carry none.
OPEN_PATHS = ("/health", "/metrics")


def make_app(engine, api_key: str | None = None, max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
             request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving `engine` (see the module docstring for what it must offer); with `api_key`, requests
    need `Authorization: Bearer <api_key>` (401 otherwise); bodies over `max_request_mb` get 413, bodies that take
    longer than `request_timeout_s` to arrive 408."""
    app = FastAPI(title="llama_dist", summary="OpenAI-compatible API over a tensor-parallel Llama")
    _install_error_handlers(app)
    app.add_middleware(_BoundedBody, max_bytes=int(max_request_mb * 2**20), timeout_s=request_timeout_s)
    if api_key:  # added last: it runs first, so a request without the key is refused before its body is read
        app.add_middleware(_RequireApiKey, api_key=api_key)
    started = int(time.time())
    metrics = ServerMetrics(engine.metrics, engine.model_name)
    token_texts = TokenTexts(engine.tokenizer)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": started, "owned_by": "llama_dist",
            "max_model_len": engine.max_seq_len,
        }]}

    @app.get("/health")
    async def health() -> JSONResponse:
        report = engine.health()
        # Load balancers and orchestrators read only the status code.
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _check_model(engine, body.model)
        if body.messages is not None:
            tokens = await _templated(engine, ChatCompletionRequest(messages=body.messages))
        elif body.prompt is not None:
            tokens = await _encoded(engine, body.prompt, body.add_special_tokens)
        else:
            raise ApiError("give a prompt or messages to tokenize", param="prompt")
        return {"count": len(tokens), "max_model_len": engine.max_seq_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        _check_model(engine, body.model)
        if not all(0 <= t < engine.vocab_size for t in body.tokens):
            raise ApiError(f"tokens must be ids in [0, {engine.vocab_size})", param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        unsupported_settings(body)
        _check_model(engine, body.model)
        prompt = body.single_prompt()
        prompt_ids = await _encoded(engine, prompt) if isinstance(prompt, str) else prompt
        logprobs = body.logprobs is not None
        generation = _generation_request(engine, body, prompt_ids, body.max_tokens, "prompt", logprobs=logprobs,
                                         top_logprobs=body.logprobs or 0, prompt_logprobs=body.echo and logprobs,
                                         guided=await _checked_grammar(engine, body))
        echo = _prompt_tokens(engine.tokenizer, prompt_ids) if body.echo else None
        if echo is not None and isinstance(prompt, str):
            echo = echo[0], prompt  # the prompt as the client wrote it, not as decoding spells it
        shape = CompletionShape(engine.model_name, body.logprobs is not None, echo)
        return await respond(engine, request, generation, body, shape, token_texts)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        unsupported_settings(body)
        _check_model(engine, body.model)
        try:
            tools, must_call = chosen_tools(checked_tools(body.tools), body.tool_choice)
        except RequestError as e:
            raise ApiError(str(e), param="tools") from None
        prompt_ids = await _templated(engine, body, body.tools or None)
        grammar = await _checked_grammar(engine, body)
        if must_call:  # "required" or a named function: the reply can only be a call
            if grammar is not None:
                raise ApiError("tool_choice required or a named function leaves no room for a response_format",
                               param="tool_choice")
            grammar = await _checked_grammar(engine, body, call_grammar(tools))
        generation = _generation_request(engine, body, prompt_ids, body.token_limit, "messages",
                                         logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0,
                                         guided=grammar)
        shape = ChatShape(engine.model_name, bool(body.logprobs), tools=bool(tools))
        return await respond(engine, request, generation, body, shape, token_texts)

    return app


class _BoundedBody:
    """ASGI middleware: a request body is read here whole, then handed on, within bounds: 413 in OpenAI's shape for
    one over `max_bytes` (at once by its Content-Length, else as soon as it passes the limit), 408 for one not
    complete within `timeout_s` (a client that stops half-way must not hold its request open forever)."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, f"the request body is over {self.max_bytes / 2**20:g} MB "
                               "(--max_request_mb)", "request_too_large")
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            await self._refuse(scope, receive, send, 408, f"the request body did not arrive within {self.timeout_s:g}"
                               " s (--request_timeout_s)", "request_timeout")
            return
        if body is None:  # the client left
            return
        if len(body) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, f"the request body is over {self.max_bytes / 2**20:g} MB "
                               "(--max_request_mb)", "request_too_large")
            return
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnects, as the app expects

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body; past max_bytes, what was read so far and a byte more (refused); None if the client left."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str, code: str) -> None:
        # The rest of the body is not read: the connection closes after the answer.
        await JSONResponse(error_body(message, code=code), status_code=status,
                           headers={"Connection": "close"})(scope, receive, send)


class _RequireApiKey:
    """ASGI middleware: 401 in OpenAI's shape unless the request carries the key (plain ASGI, not FastAPI's
    BaseHTTPMiddleware, which would stand between a stream and its client's disconnect)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- from a request body to a GenerationRequest ----------------------------------------------------------------

def _check_model(engine, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise ApiError(f"the model '{model}' does not exist: this server serves '{engine.model_name}'", 404,
                       param="model", code="model_not_found")


def _check_length(text: str, max_seq_len: int, param: str = "prompt") -> None:
    """400 for text no tokenizer could fit in max_seq_len tokens, before tokenizing it."""
    if len(text) > MAX_CHARS_PER_TOKEN * max_seq_len:
        raise ApiError(f"the {param} ({len(text)} characters) cannot fit in any {max_seq_len}-token context",
                       param=param, code="context_length_exceeded")


async def _encoded(engine, text: str, bos: bool = True) -> list[int]:
    """The text's token ids, tokenized on a worker thread once its length is known to fit."""
    _check_length(text, engine.max_seq_len)
    return await asyncio.to_thread(_encode, engine.tokenizer, text, bos)


async def _templated(engine, body: ChatCompletionRequest, tools: list[dict] | None = None) -> list[int]:
    """The chat's prompt ids, templated and tokenized on a worker thread once its length is known to fit."""
    _check_length("".join(m.text() for m in body.messages), engine.max_seq_len, "messages")
    return await asyncio.to_thread(_chat_prompt, engine.tokenizer, body, tools)


def _encode(tokenizer, text: str, bos: bool = True) -> list[int]:
    try:
        return tokenizer.encode(text, bos=bos, eos=False)
    except TokenizerError as e:
        raise ApiError(str(e), param="prompt") from None


def _chat_prompt(tokenizer, body: ChatCompletionRequest, tools: list[dict] | None = None) -> list[int]:
    if not body.messages:
        raise ApiError("messages is empty: a chat needs at least one message", param="messages")
    for i, message in enumerate(body.messages):
        if message.role not in CHAT_ROLES:
            raise ApiError(f"messages[{i}] has role {message.role!r}; supported roles are {', '.join(CHAT_ROLES)}",
                           param=f"messages[{i}].role")
    dialog = template_messages([
        {"role": "system" if m.role == "developer" else m.role, "content": m.text(), "tool_calls": m.tool_calls,
         "tool_call_id": m.tool_call_id} for m in body.messages])
    try:
        return format_dialog(tokenizer, dialog, tools)
    except (DialogError, TokenizerError) as e:
        raise ApiError(str(e), param="messages") from None


async def _checked_grammar(engine, body, grammar: Grammar | None = None) -> Grammar | None:
    """The request's grammar (or `grammar`), checked (and compiled, cached) on a worker thread, away from the event
    loop."""
    grammar = body.grammar() if grammar is None else grammar
    if grammar is not None:
        try:
            await asyncio.to_thread(engine.check_grammar, grammar)
        except RequestError as e:
            raise ApiError(str(e), param="response_format") from None
    return grammar


def _generation_request(engine, body, prompt_ids: list[int], max_tokens: int | None, prompt_param: str,
                        logprobs: bool, top_logprobs: int = 0, prompt_logprobs: bool = False,
                        guided: Grammar | None = None) -> GenerationRequest:
    vocab_size, max_seq_len = engine.vocab_size, engine.max_seq_len
    for i, token in enumerate(prompt_ids):
        if not 0 <= token < vocab_size:
            raise ApiError(f"prompt token {i} is {token}, outside the vocabulary [0, {vocab_size})",
                           param=prompt_param)
    room = max_seq_len - len(prompt_ids)
    if room < 1:
        raise ApiError(f"the prompt is {len(prompt_ids)} tokens, which leaves no room to generate within "
                       f"max_seq_len {max_seq_len}", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:  # as many as fit
        max_tokens = room
    elif max_tokens > room:
        raise ApiError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) is more than "
                       f"max_seq_len {max_seq_len}", param="max_tokens", code="context_length_exceeded")
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    bias = body.token_bias()
    if any(t >= vocab_size for t in bias):
        raise ApiError(f"logit_bias names token ids outside the vocabulary [0, {vocab_size})", param="logit_bias")
    try:  # checked as it is made: refused here as a 400, not failed in the engine
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=body.seed,
                                stop_token_ids=list(engine.tokenizer.stop_tokens), ignore_eos=True,
                                logprobs=logprobs or bool(top_logprobs), top_logprobs=top_logprobs,
                                prompt_logprobs=prompt_logprobs, logit_bias=bias, guided=guided)
    except RequestError as e:
        raise ApiError(str(e)) from None
    return GenerationRequest(list(prompt_ids), params)


def _prompt_tokens(tokenizer, prompt_ids: list[int]) -> tuple[list[GeneratedToken], str]:
    """The prompt's tokens (with no logprobs: the engine scores only what it generates) and its text."""
    decoder, tokens, text = IncrementalDecoder(tokenizer), [], ""
    for token in prompt_ids:
        piece = decoder.add(token)
        tokens.append(GeneratedToken(piece, None, len(text)))
        text += piece
    rest = decoder.flush()
    tokens[-1].text += rest
    return tokens, text + rest


# ---- errors in OpenAI's shape ----------------------------------------------------------------------------------

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers a malformed body with 400, not FastAPI's 422, and names the first offending field.
        errors = exc.errors()
        first = errors[0] if errors else {}
        path = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first.get("msg", "invalid request body")
        if path:
            message = f"{'.'.join(path)}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_body(message, param=path[0] if path else None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", type="server_error"),
                            status_code=500)
