"""What one request asks of sampling and stopping: SamplingParams (vLLM's names), checked once on rank 0."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from llama_dist.engine.structured_output import Grammar
from llama_dist.errors import RequestError

MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_p in (0, 1]; top_k 0 (or -1) keeps every token; max_tokens None: until the
    sequence reaches max_seq_len. stop_token_ids end the output (the tokenizer's stop tokens too, unless
    ignore_eos); a stop string ends it before the string. seed: this request's own random stream (None: the
    engine's). logprobs: the chosen token's log-probability; top_logprobs: also the k most likely tokens'; both the
    model's raw log-softmax, before temperature and filters. prompt_logprobs: each prompt token's log-probability
    given the tokens before it (the first has none). logit_bias: {token id: bias} added to the logits before
    sampling (greedy too), as OpenAI's: -100 bans a token in practice, +100 all but forces it; log-probabilities
    stay the model's own. guided: a grammar the output must follow (structured output: engine.structured_output);
    it ends the output once the grammar is complete."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    guided: Grammar | None = None

    def __post_init__(self) -> None:
        self.check()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self) -> None:
        """RequestError naming the first setting sampling cannot use."""
        check_sampling(self.temperature, self.top_p)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise RequestError(f"top_k must be an integer >= -1 (0 or -1: no limit), got {self.top_k!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            raise RequestError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be token ids, got {self.stop_token_ids!r:.80}")
        if not isinstance(self.logit_bias, dict) or not all(
                _is_int(t) and t >= 0 and isinstance(b, numbers.Real) and not isinstance(b, bool)
                and -100 <= b <= 100 for t, b in self.logit_bias.items()):
            raise RequestError(f"logit_bias must map token ids to numbers in [-100, 100], got {self.logit_bias!r:.80}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be non-empty strings, got {self.stop!r:.80}")


def check_sampling(temperature, top_p, max_gen_len=None) -> None:
    """Refuse settings sampling cannot use (RequestError naming the setting); max_gen_len None means "until the
    cache ends"."""
    if max_gen_len is not None and (
        not isinstance(max_gen_len, numbers.Integral) or isinstance(max_gen_len, bool) or max_gen_len < 1
    ):
        raise RequestError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
    if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not math.isfinite(temperature)
            or temperature < 0):
        raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
