"""The OpenAI API's request bodies (the fields clients actually send), its response and error shapes.

Models are strict (a string is not a number, 1 is not true) so a wrong type is refused rather than guessed at;
unknown fields are ignored, as clients add their own. Fields this runtime cannot honour are accepted at their
neutral value and refused otherwise (`unsupported_settings`), so nobody gets a silently different sampling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from llama_dist.engine.structured_output import Grammar
from llama_dist.serve.tools import CallWatch, parse_tool_calls
from llama_dist.text.detokenizer import GeneratedToken

__all__ = [
    "ApiError", "CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "error_body",
    "unsupported_settings", "CompletionShape", "ChatShape", "TokenizeRequest", "DetokenizeRequest",
]

MAX_CHOICES = 64  # n: choices of one request
# JSON has no -inf; OpenAI reports a token it considers impossible with this value.
LOWEST_LOGPROB = -9999.0
# torch.Generator.manual_seed takes any value that fits 64 bits, signed or not.
SEED_RANGE = (-(2**63), 2**64 - 1)


class ApiError(Exception):
    """A request the server refuses or cannot finish, answered with OpenAI's error JSON."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields the two endpoints share. None (which some clients send for "not set") means the default."""

    model: StrictStr | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: StrictInt | None = 1
    user: StrictStr | None = None  # accepted and ignored, as abuse tracking is not ours to do
    logit_bias: dict[StrictStr, float] | None = None  # {token id as a string: bias in [-100, 100]}
    # Structured output: OpenAI's response_format, or vLLM's extra fields (one of them at most).
    response_format: dict | None = None
    guided_json: dict | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None  # Lark
    # Accepted only at their neutral values (see unsupported_settings).
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(f"stop takes at most 4 strings, got {len(stops)}", param="stop")
        return [s for s in stops if s]  # an empty stop string would match at once: ignore it, as OpenAI does

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def grammar(self) -> Grammar | None:
        """The grammar the output must follow, if the request sets one (ApiError for a malformed one)."""
        grammars = []
        fmt = self.response_format
        if fmt is not None and fmt.get("type", "text") != "text":
            if fmt.get("type") == "json_object":
                grammars.append(Grammar("json_object"))
            elif fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict) \
                    and isinstance(fmt["json_schema"].get("schema", {}), dict):
                grammars.append(Grammar("json_schema", json.dumps(fmt["json_schema"].get("schema", {}))))
            else:
                raise ApiError("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                               "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                               param="response_format")
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            grammars.append(Grammar("json_schema", schema))
        if self.guided_regex is not None:
            grammars.append(Grammar("regex", self.guided_regex))
        if self.guided_choice is not None:
            grammars.append(Grammar("choice", json.dumps(self.guided_choice)))
        if self.guided_grammar is not None:
            grammars.append(Grammar("lark", self.guided_grammar))
        if len(grammars) > 1:
            raise ApiError("set one of response_format, guided_json, guided_regex, guided_choice and guided_grammar",
                           param="response_format")
        return grammars[0] if grammars else None

    def token_bias(self) -> dict[int, float]:
        """logit_bias with its keys as token ids (JSON object keys are strings)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise ApiError(f"logit_bias keys must be token ids, got {key!r:.40}", param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
            bias[int(key)] = float(value)
        return bias


# A prompt: text, token ids, or a batch of either (of which only one prompt is served per request).
Prompt = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: StrictInt | None = Field(16, ge=0)  # OpenAI's default; None: as many as fit; 0: score (echo)
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # legacy: an int, the number of alternatives asked for
    echo: bool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (text or token ids)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(f"only one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError("the prompt is empty", param="prompt")
        return prompt


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None  # accepted; the Llama chat formats have no place for it
    tool_calls: list[dict] | None = None  # an assistant's calls, in the history
    tool_call_id: StrictStr | None = None  # a tool's answer: to which call

    def text(self) -> str:
        if isinstance(self.content, list):
            # Separate text parts read as separate paragraphs, as other OpenAI-compatible servers join them.
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: StrictStr | dict | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt (BOS added unless add_special_tokens is false), or chat messages templated."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]


def unsupported_settings(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse (400) settings this runtime cannot honour, naming them."""

    def refuse(param: str, why: str) -> None:
        raise ApiError(f"{param}: {why} is not supported by this server", param=param)

    if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
        raise ApiError(f"n must be 1 to {MAX_CHOICES}, got {body.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            refuse(name, "a non-zero penalty")
    if isinstance(body, CompletionRequest):
        if body.best_of not in (None, 1):
            refuse("best_of", "best_of > 1")
        if body.suffix:
            refuse("suffix", "inserting before a suffix")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError("max_tokens 0 generates nothing: it is for scoring the prompt, with echo", param="max_tokens")
    else:
        if body.top_logprobs and not body.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")


# ---- OpenAI's response shapes -------------------------------------------------------------------------------

def _logprob(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return max(value, LOWEST_LOGPROB)


class _Shape:
    """One response's JSON in OpenAI's shape: the whole body (`response`), or the stream's chunks
    (`opening_chunks`, then `chunk` per piece of text, then `usage_chunk`), all under one id."""

    def __init__(self, model: str, id_prefix: str):
        self.id, self.created, self.model = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), model

    def envelope(self, object_name: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}


class CompletionShape(_Shape):
    def __init__(self, model: str, logprobs: bool, echo: tuple[list[GeneratedToken], str] | None):
        super().__init__(model, "cmpl")
        self.logprobs = logprobs
        self.echo_tokens, self.echo_text = echo or ([], "")

    def _choice(self, text: str, tokens: list[GeneratedToken], finish_reason: str | None,
                offset_base: int = 0, index: int = 0) -> dict:
        logprobs = None
        if self.logprobs:
            top = None
            if any(t.top is not None for t in tokens):  # logprobs: k > 0 (the first prompt token has none)
                top = [None if t.top is None else {text: _logprob(lp) for text, lp in t.top} for t in tokens]
            logprobs = {"tokens": [t.text for t in tokens], "token_logprobs": [_logprob(t.logprob) for t in tokens],
                        "top_logprobs": top, "text_offset": [offset_base + t.offset for t in tokens]}
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}

    def score_prompt(self, logprobs: list[float | None], top: list[list[tuple[str, float]] | None] | None) -> None:
        """The echoed prompt's tokens get their log-probabilities (and alternatives) once the engine has them."""
        for i, token in enumerate(self.echo_tokens):
            token.logprob = logprobs[i] if i < len(logprobs) else None
            token.top = top[i] if top and i < len(top) else None

    def opening_chunks(self, index: int = 0) -> list[dict]:
        if not self.echo_text and not self.echo_tokens:
            return []
        return [self.envelope("text_completion", [self._choice(self.echo_text, self.echo_tokens, None, 0, index)])]

    def chunk(self, text: str, tokens: list[GeneratedToken], finish_reason: str | None, index: int = 0) -> dict:
        return self.envelope("text_completion",
                             [self._choice(text, tokens, finish_reason, len(self.echo_text), index)])

    def usage_chunk(self, usage: dict) -> dict:
        return self.envelope("text_completion", [], usage=usage)

    def response(self, choices: list[tuple[str, list[GeneratedToken], str]], usage: dict) -> dict:
        """choices: each one's (text, tokens, finish_reason)."""
        bodies = []
        for index, (text, tokens, finish_reason) in enumerate(choices):
            shifted = [dataclasses.replace(t, offset=t.offset + len(self.echo_text)) for t in tokens]
            bodies.append(self._choice(self.echo_text + text, self.echo_tokens + shifted, finish_reason, 0, index))
        return self.envelope("text_completion", bodies, usage=usage)


class ChatShape(_Shape):
    """tools: the reply may be tool calls (serve.tools): they become `tool_calls`, and a stream holds its text back
    while it may still be one."""

    def __init__(self, model: str, logprobs: bool, tools: bool = False):
        super().__init__(model, "chatcmpl")
        self.logprobs, self.tools = logprobs, tools
        self._watches: dict[int, tuple[CallWatch, list[GeneratedToken]]] = {}  # per choice: held text and tokens

    def _logprobs(self, tokens: list[GeneratedToken]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{"token": t.text, "logprob": _logprob(t.logprob), "bytes": list(t.text.encode()),
                             "top_logprobs": [{"token": text, "logprob": _logprob(lp), "bytes": list(text.encode())}
                                              for text, lp in t.top or ()]} for t in tokens], "refusal": None}

    def _chunk(self, delta: dict, logprobs: dict | None, finish_reason: str | None, index: int) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self.envelope("chat.completion.chunk", [choice])

    def opening_chunks(self, index: int = 0) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""}, None, None, index)]

    def chunk(self, text: str, tokens: list[GeneratedToken], finish_reason: str | None,
              index: int = 0) -> dict | None:
        """The chunk to send, or None while a possible tool call is held back."""
        if self.tools:
            text, tokens, calls = self._watch(index, text, tokens, finish_reason is not None)
            if calls:
                return self._chunk({"tool_calls": [dict(call, index=j) for j, call in enumerate(calls)]}, None,
                                   "tool_calls", index)
            if not text and not tokens and finish_reason is None:
                return None
        delta = {"content": text} if text or finish_reason is None else {}
        return self._chunk(delta, self._logprobs(tokens) if tokens else None, finish_reason, index)

    def _watch(self, index: int, text: str, tokens: list[GeneratedToken], final: bool):
        """(text, tokens) that may go now, and the tool calls once the reply has ended as calls."""
        watch, held = self._watches.setdefault(index, (CallWatch(), []))
        released = watch.add(text)
        if watch.decided_text:
            out, held[:] = held + tokens, []
            return released, out, None
        held += tokens
        if not final:
            return "", [], None
        calls = parse_tool_calls(watch.held)
        if calls:
            return "", [], calls
        text, out = watch.held, list(held)
        watch.held, watch.decided_text, held[:] = "", True, []
        return text, out, None

    def usage_chunk(self, usage: dict) -> dict:
        return self.envelope("chat.completion.chunk", [], usage=usage)

    def response(self, choices: list[tuple[str, list[GeneratedToken], str]], usage: dict) -> dict:
        """choices: each one's (text, tokens, finish_reason)."""
        bodies = []
        for index, (text, tokens, finish_reason) in enumerate(choices):
            message = {"role": "assistant", "content": text}
            calls = parse_tool_calls(text) if self.tools else None
            if calls:
                message, finish_reason = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            bodies.append({"index": index, "message": message, "logprobs": self._logprobs(tokens),
                           "finish_reason": finish_reason})
        return self.envelope("chat.completion", bodies, usage=usage)
