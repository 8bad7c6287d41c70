"""The OpenAI API's request bodies (the fields clients actually send), its response and error shapes.

Models are strict (a string is not a number, 1 is not true) so a wrong type is refused rather than guessed at;
unknown fields are ignored, as clients add their own. Fields this runtime cannot honour are accepted at their
neutral value and refused otherwise (`unsupported_settings`), so nobody gets a silently different sampling.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from llama_dist.text.detokenizer import GeneratedToken

__all__ = [
    "ApiError", "CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "error_body",
    "unsupported_settings", "CompletionShape", "ChatShape",
]

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
    # Accepted only at their neutral values (see unsupported_settings).
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[StrictStr, float] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(f"stop takes at most 4 strings, got {len(stops)}", param="stop")
        return [s for s in stops if s]  # an empty stop string would match at once: ignore it, as OpenAI does

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# A prompt: text, token ids, or a batch of either (of which only one prompt is served per request).
Prompt = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default; None: as many as fit
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
    top_logprobs: StrictInt | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def unsupported_settings(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse (400) settings this runtime cannot honour, naming them."""

    def refuse(param: str, why: str) -> None:
        raise ApiError(f"{param}: {why} is not supported by this server", param=param)

    if body.n not in (None, 1):
        refuse("n", "more than one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            refuse(name, "a non-zero penalty")
    if body.logit_bias:
        refuse("logit_bias", "biasing tokens")
    if isinstance(body, CompletionRequest):
        if body.best_of not in (None, 1):
            refuse("best_of", "best_of > 1")
        if body.suffix:
            refuse("suffix", "inserting before a suffix")
    else:
        if body.top_logprobs:
            refuse("top_logprobs", "returning alternative tokens")
        if body.tools:
            refuse("tools", "tool calling")
        if body.response_format and body.response_format.get("type", "text") != "text":
            refuse("response_format", "a structured response format")


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
                offset_base: int = 0) -> dict:
        logprobs = None
        if self.logprobs:
            logprobs = {"tokens": [t.text for t in tokens], "token_logprobs": [_logprob(t.logprob) for t in tokens],
                        "top_logprobs": None,  # the engine reports only the sampled token's logprob
                        "text_offset": [offset_base + t.offset for t in tokens]}
        return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening_chunks(self) -> list[dict]:
        if not self.echo_text and not self.echo_tokens:
            return []
        return [self.envelope("text_completion", [self._choice(self.echo_text, self.echo_tokens, None)])]

    def chunk(self, text: str, tokens: list[GeneratedToken], finish_reason: str | None) -> dict:
        return self.envelope("text_completion", [self._choice(text, tokens, finish_reason, len(self.echo_text))])

    def usage_chunk(self, usage: dict) -> dict:
        return self.envelope("text_completion", [], usage=usage)

    def response(self, text: str, tokens: list[GeneratedToken], finish_reason: str, usage: dict) -> dict:
        shifted = [GeneratedToken(t.text, t.logprob, t.offset + len(self.echo_text)) for t in tokens]
        choice = self._choice(self.echo_text + text, self.echo_tokens + shifted, finish_reason)
        return self.envelope("text_completion", [choice], usage=usage)


class ChatShape(_Shape):
    def __init__(self, model: str, logprobs: bool):
        super().__init__(model, "chatcmpl")
        self.logprobs = logprobs

    def _logprobs(self, tokens: list[GeneratedToken]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{"token": t.text, "logprob": _logprob(t.logprob), "bytes": list(t.text.encode()),
                             "top_logprobs": []} for t in tokens], "refusal": None}

    def _chunk(self, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self.envelope("chat.completion.chunk", [choice])

    def opening_chunks(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""}, None, None)]

    def chunk(self, text: str, tokens: list[GeneratedToken], finish_reason: str | None) -> dict:
        delta = {"content": text} if text or finish_reason is None else {}
        return self._chunk(delta, self._logprobs(tokens) if tokens else None, finish_reason)

    def usage_chunk(self, usage: dict) -> dict:
        return self.envelope("chat.completion.chunk", [], usage=usage)

    def response(self, text: str, tokens: list[GeneratedToken], finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": self._logprobs(tokens), "finish_reason": finish_reason}
        return self.envelope("chat.completion", [choice], usage=usage)
