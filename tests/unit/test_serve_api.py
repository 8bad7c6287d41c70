"""The OpenAI-compatible HTTP layer (serve/api.py, serve/http_server.py), over real HTTP on 127.0.0.1, with the
official `openai` client (and httpx for raw error shapes and streams), against a deterministic fake engine."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the openai client is the test client (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from llama_dist.dist.launch_env import free_port  # noqa: E402
from llama_dist.engine.metrics import EngineMetrics  # noqa: E402
from llama_dist.errors import ConfigError  # noqa: E402
from llama_dist.serve.api import make_app  # noqa: E402
from llama_dist.serve.http_server import HttpServer  # noqa: E402
from llama_dist.serve.requests import Finished, RequestHandle, ServerBusy, TokenEvent  # noqa: E402
from llama_dist.text.chat import format_dialog  # noqa: E402
from llama_dist.text.detokenizer import CompletionText  # noqa: E402
from llama_dist.text.tokenizer import load_tokenizer  # noqa: E402

# What the fake model "generates" for any prompt, then its end-of-sequence token. The llama emoji is not in the
# test tokenizer's vocabulary: it comes out as four byte tokens, so the server must hold back partial characters.
SCRIPT = "hello world, the llama answer: café 🦙 naïve model. the end"
# A text completion continues its prompt: SentencePiece spells the space before the first word (a chat reply
# starts at its first word, as Meta's chat_completion gives it).
CONTINUATION = " " + SCRIPT
MAX_SEQ_LEN = 96
WAIT_S = 10.0  # upper bound for anything the tests wait on


class FakeEngine:
    """The engine interface the API uses, generating SCRIPT's tokens (then EOS) on a thread per request. Honours
    max_tokens, stop tokens and cancel(); knobs make it slow, endless, busy or failing."""

    model_name = "fake-llama"
    max_batch_size = 4

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.n_words
        self.max_seq_len = MAX_SEQ_LEN
        self.metrics = EngineMetrics()
        self.script = tokenizer.encode(SCRIPT, bos=False, eos=False)
        self.submitted = []
        self.handles: dict[int, RequestHandle] = {}
        self.reset()

    def reset(self) -> None:
        self.busy = False  # submit raises ServerBusy
        self.endless = False  # cycle the script with no EOS
        self.token_delay_s = 0.0
        self.fail_after: int | None = None  # end with Finished("error") after this many tokens
        self.status = "ok"

    def cancelled(self, request) -> bool:
        """Whether the HTTP side called cancel() on the request's handle."""
        return self.handles[request.id].cancelled

    def health(self) -> dict:
        return {"status": self.status, "running": 0, "waiting": 0}

    def submit(self, request) -> RequestHandle:
        if self.busy:
            raise ServerBusy("the waiting queue is full")
        handle = RequestHandle(request, asyncio.get_running_loop())
        self.submitted.append(request)
        self.handles[request.id] = handle
        threading.Thread(target=self._generate, args=(handle,), daemon=True).start()
        return handle

    def _generate(self, handle: RequestHandle) -> None:
        request = handle.request
        tokens = self.script if self.endless else self.script + [self.tokenizer.eos_id]
        n = 0
        if request.params.prompt_logprobs:  # the engine sets them before the first event
            handle.prompt_logprobs = [None] + [-1.0 - 0.01 * i for i in range(1, len(request.prompt_tokens))]
            handle.prompt_top_logprobs = [None] + [[(7, -0.25)]] * (len(request.prompt_tokens) - 1)
        for step in range(10_000):  # bounded even when endless: 10k tokens at most
            end = None
            if handle.cancelled:
                end = Finished("cancelled", len(request.prompt_tokens), n)
            elif self.fail_after is not None and n == self.fail_after:
                end = Finished("error", len(request.prompt_tokens), n, error="the fake engine failed")
            elif n == request.params.max_tokens:
                end = Finished("length", len(request.prompt_tokens), n)
            elif tokens[step % len(tokens)] in request.params.stop_token_ids:
                end = Finished("stop", len(request.prompt_tokens), n)
            if end is not None:
                handle.push(end)
                return
            token = tokens[step % len(tokens)]
            params = request.params
            top = ((token, -0.5), (7, -1.5), (9, -2.5))[: params.top_logprobs] if params.top_logprobs else None
            handle.push(TokenEvent(token, -0.5 - 0.1 * (n % 3) if params.logprobs else None, top))
            n += 1
            time.sleep(self.token_delay_s)
        handle.push(Finished("length", len(request.prompt_tokens), n))


@pytest.fixture(scope="module")
def tokenizer(spm_model_path):
    tok = load_tokenizer(spm_model_path)
    assert tok.decode(tok.encode(SCRIPT, bos=False, eos=False)) == SCRIPT
    return tok


@pytest.fixture(scope="module")
def served(tokenizer):
    engine = FakeEngine(tokenizer)
    server = HttpServer()
    server.start(make_app(engine), "127.0.0.1", free_port())
    yield engine, f"http://127.0.0.1:{server.port}"
    assert server.stop(timeout_s=WAIT_S), "the HTTP server thread did not end"


@pytest.fixture
def engine(served):
    served[0].reset()
    yield served[0]
    served[0].reset()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[1], timeout=WAIT_S) as c:
        yield c


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _sse_payloads(response) -> list:
    """The JSON payloads of a raw SSE response, checking it ends with [DONE]."""
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# ---- the good paths ---------------------------------------------------------------------------------------------

def test_models_and_health(client, http, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-llama"]
    response = http.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    engine.status = "shutting down"
    assert http.get("/health").status_code == 503


def test_completion_stream_and_non_stream_agree(client, engine, tokenizer):
    prompt = "hello llama"
    full = client.completions.create(model="fake-llama", prompt=prompt, max_tokens=None, temperature=0, seed=7)
    choice = full.choices[0]
    assert full.object == "text_completion" and full.id.startswith("cmpl-") and full.model == "fake-llama"
    assert choice.text == CONTINUATION and choice.finish_reason == "stop"
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    assert prompt + choice.text == tokenizer.decode(prompt_ids + engine.script)
    request = engine.submitted[-1]
    params = request.params
    assert request.prompt_tokens == prompt_ids and params.max_tokens == MAX_SEQ_LEN - len(prompt_ids)
    assert (params.temperature, params.top_p, params.seed, params.logprobs) == (0.0, 1.0, 7, False)
    assert tuple(params.stop_token_ids) == tuple(tokenizer.stop_tokens)
    assert full.usage.prompt_tokens == len(prompt_ids)
    assert full.usage.completion_tokens == len(engine.script)
    assert full.usage.total_tokens == len(prompt_ids) + len(engine.script)

    chunks = list(client.completions.create(model="fake-llama", prompt=prompt, max_tokens=None, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == CONTINUATION
    assert not any("\ufffd" in t for t in texts), "a partial UTF-8 character was streamed"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_completion_token_prompt_length_limit_and_echo(client, engine, tokenizer):
    ids = tokenizer.encode("the model", bos=True, eos=False)
    for prompt in (ids, [ids]):
        out = client.completions.create(model="fake-llama", prompt=prompt, max_tokens=3)
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
        assert engine.submitted[-1].prompt_tokens == ids
    assert out.choices[0].text == " " + tokenizer.decode(engine.script[:3])
    echoed = client.completions.create(model="fake-llama", prompt=["the model"], max_tokens=3, echo=True)
    assert echoed.choices[0].text == "the model" + out.choices[0].text
    default = client.completions.create(model="fake-llama", prompt="the model")
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_chat_stream_and_non_stream_agree(client, engine, tokenizer):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    full = client.chat.completions.create(model="fake-llama", messages=messages)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == SCRIPT
    assert choice.finish_reason == "stop"
    expected_prompt = format_dialog(tokenizer, [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": "hello\nworld"}])
    assert engine.submitted[-1].prompt_tokens == expected_prompt
    assert full.usage.prompt_tokens == len(expected_prompt)

    chunks = list(client.chat.completions.create(model="fake-llama", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SCRIPT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()

    short = client.chat.completions.create(model="fake-llama", messages=messages[1:], max_completion_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


@pytest.mark.parametrize("stop", ["llama", ["zzz", "é 🦙"], ["d, the", "world"]])
def test_stop_strings_cut_the_text(client, engine, stop):
    stops = [stop] if isinstance(stop, str) else stop
    expected = CONTINUATION[:min(CONTINUATION.find(s) for s in stops if s in CONTINUATION)]
    out = client.completions.create(model="fake-llama", prompt="hi", max_tokens=None, stop=stop)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    assert 0 < out.usage.completion_tokens < len(engine.script)
    assert engine.cancelled(engine.submitted[-1]), "the stop string did not cancel the request"

    texts, reasons = [], []
    for chunk in client.completions.create(model="fake-llama", prompt="hi", max_tokens=None, stop=stop, stream=True):
        texts.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(texts) == expected and reasons[-1] == "stop"

    chat = client.chat.completions.create(model="fake-llama", messages=[{"role": "user", "content": "hi"}], stop=stop)
    assert chat.choices[0].message.content == expected.lstrip(" ") and chat.choices[0].finish_reason == "stop"


def test_logprobs(client, engine):
    out = client.completions.create(model="fake-llama", prompt="hi", max_tokens=8, logprobs=0)
    logprobs = out.choices[0].logprobs
    assert "".join(logprobs.tokens) == out.choices[0].text
    assert len(logprobs.token_logprobs) == 8 and all(lp < 0 for lp in logprobs.token_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert logprobs.top_logprobs is None
    assert engine.submitted[-1].params.logprobs is True

    streamed = [c.choices[0].logprobs for c in
                client.completions.create(model="fake-llama", prompt="hi", max_tokens=8, logprobs=0, stream=True)]
    assert sum((lp.tokens for lp in streamed if lp), []) == logprobs.tokens

    chat = client.chat.completions.create(model="fake-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          logprobs=True)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content == out.choices[0].text.lstrip(" ")
    assert [t.logprob for t in content] == logprobs.token_logprobs
    assert [t.bytes for t in content] == [list(t.token.encode()) for t in content]

    plain = client.chat.completions.create(model="fake-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None and engine.submitted[-1].params.logprobs is False


# ---- refusals -------------------------------------------------------------------------------------------------

BAD_COMPLETIONS = {
    "n=0": {"n": 0},
    "n above 64": {"n": 65},
    "temperature above 2": {"temperature": 2.5},
    "negative temperature": {"temperature": -0.1},
    "top_p 0": {"top_p": 0},
    "top_p above 1": {"top_p": 1.5},
    "max_tokens 0": {"max_tokens": 0},
    "prompt too long": {"max_tokens": MAX_SEQ_LEN},
    "token id beyond the vocabulary": {"prompt": [1, 5, 100_000]},
    "negative token id": {"prompt": [-1]},
    "empty prompt": {"prompt": []},
    "two prompts": {"prompt": ["a", "b"]},
    "temperature of the wrong type": {"temperature": "hot"},
    "max_tokens of the wrong type": {"max_tokens": 1.5},
    "stream of the wrong type": {"stream": "yes"},
    "five stop strings": {"stop": ["a", "b", "c", "d", "e"]},
    "a presence penalty": {"presence_penalty": 0.5},
    "no prompt": {"prompt": None},
    "logit_bias key not a token id": {"logit_bias": {"x": 1}},
    "logit_bias beyond the vocabulary": {"logit_bias": {"100000": 1}},
    "logit_bias above 100": {"logit_bias": {"5": 101}},
}
BAD_CHATS = {
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "a Llama 2 dialog out of order": {"messages": [{"role": "assistant", "content": "hi"}]},
    "messages of the wrong type": {"messages": "hi"},
    "content of the wrong type": {"messages": [{"role": "user", "content": 5}]},
    "top_logprobs without logprobs": {"top_logprobs": 3},
    "top_logprobs above 20": {"logprobs": True, "top_logprobs": 21},
    "n=0": {"n": 0},
    "dialog too long": {"messages": [{"role": "user", "content": "the llama model " * 40}]},
    "max_completion_tokens 0": {"max_completion_tokens": 0},
}


@pytest.mark.parametrize("path, body", [
    *[("/v1/completions", {"model": "fake-llama", "prompt": "hi", "max_tokens": 4, **bad}) for bad in BAD_COMPLETIONS.values()],
    *[("/v1/chat/completions", {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}], **bad})
      for bad in BAD_CHATS.values()],
], ids=[*(f"completions: {k}" for k in BAD_COMPLETIONS), *(f"chat: {k}" for k in BAD_CHATS)])
def test_bad_request_gets_400_and_the_server_keeps_serving(http, engine, path, body):
    submitted = len(engine.submitted)
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str) and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert len(engine.submitted) == submitted, "a refused request reached the engine"
    good = http.post(path, json={"model": "fake-llama", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 2})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_malformed_json_gets_400(http):
    response = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fake-llama", prompt="hi", max_tokens=4, temperature=3)
    assert info.value.status_code == 400 and "temperature" in str(info.value)


def test_busy_engine_gets_429(client, http, engine):
    engine.busy = True
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="fake-llama", prompt="hi", max_tokens=2)
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
    engine.busy = False
    assert client.completions.create(model="fake-llama", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_engine_failure_is_a_500_or_an_error_event(http, engine):
    engine.fail_after = 2
    response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stream": True}) as response:
        assert response.status_code == 200
        payloads = _sse_payloads(response)
    assert "fake engine failed" in payloads[-1]["error"]["message"]
    engine.fail_after = None
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_raw_stream_shape(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = _sse_payloads(response)
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] == "length" and payloads[-1]["choices"][0]["delta"] == {}


# ---- clients that go away -------------------------------------------------------------------------------------

def test_closing_a_stream_cancels_the_request(served, engine):
    engine.endless, engine.token_delay_s = True, 0.01
    body = {"prompt": "hi", "max_tokens": MAX_SEQ_LEN - 10, "stream": True}
    with httpx.Client(base_url=served[1], timeout=WAIT_S) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            events = (line for line in response.iter_lines() if line)
            for _ in range(3):
                assert next(events).startswith("data: ")
            request = engine.submitted[-1]
            assert not engine.cancelled(request)
    _wait_for(lambda: engine.cancelled(request), "the closed stream to cancel its request")


def test_a_client_that_times_out_cancels_the_request(served, engine):
    engine.endless, engine.token_delay_s = True, 0.05  # 86 tokens: over 4 s, far longer than the client waits
    with httpx.Client(base_url=served[1], timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"prompt": "hi", "max_tokens": MAX_SEQ_LEN - 10})
    request = engine.submitted[-1]
    _wait_for(lambda: engine.cancelled(request), "the vanished client to cancel its request")


# ---- the pieces -----------------------------------------------------------------------------------------------

def test_busy_port_is_a_config_error(served):
    port = int(served[1].rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
        HttpServer().start(make_app(served[0]), "127.0.0.1", port)


def test_completion_text_holds_back_possible_stops_and_partial_characters(tokenizer):
    ids = tokenizer.encode(SCRIPT, bos=False, eos=False)
    completion = CompletionText(tokenizer, stop=["naïve model!"])  # starts to match, then does not
    released = []
    for token in ids:
        completion.add(token, None)
        text, _ = completion.release()
        assert "\ufffd" not in text
        released.append(text)
        assert not "".join(released).endswith("naïve")  # held while it may still become the stop string
    completion.end()
    released.append(completion.release()[0])
    assert "".join(released) == SCRIPT == completion.text == "".join(t.text for t in completion.tokens)
    assert not completion.stopped


def test_metrics_are_prometheus_text_and_follow_the_engine(http, engine):
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        response = http.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return {s.name: s.value for family in text_string_to_metric_families(response.text) for s in family.samples
                if s.labels.get("model_name") == "fake-llama" and "le" not in s.labels}

    before = scrape()
    assert before["llama_dist:num_requests_running"] == 0
    seq = SimpleNamespace(first_token_s=None, last_token_s=None, arrival_s=time.monotonic() - 0.25)
    engine.metrics.token_generated(seq, time.monotonic())  # a first token after ~0.25 s
    engine.metrics.token_generated(seq, seq.last_token_s + 0.05)
    engine.metrics.num_running, engine.metrics.prompt_tokens = 2, engine.metrics.prompt_tokens + 7
    after = scrape()
    assert after["llama_dist:num_requests_running"] == 2
    assert after["llama_dist:prompt_tokens_total"] == before["llama_dist:prompt_tokens_total"] + 7
    assert after["llama_dist:generation_tokens_total"] == before["llama_dist:generation_tokens_total"] + 2
    assert after["llama_dist:time_to_first_token_seconds_count"] == before["llama_dist:time_to_first_token_seconds_count"] + 1
    assert after["llama_dist:time_to_first_token_seconds_sum"] >= before["llama_dist:time_to_first_token_seconds_sum"] + 0.2
    assert after["llama_dist:inter_token_latency_seconds_count"] == before["llama_dist:inter_token_latency_seconds_count"] + 1


# ---- logprobs, scoring, biases, models, tokenizing, keys ------------------------------------------------------

def test_top_logprobs_of_completions_and_chats(client, engine):
    out = client.completions.create(model="fake-llama", prompt="hi", max_tokens=4, logprobs=2)
    top = out.choices[0].logprobs.top_logprobs
    assert engine.submitted[-1].params.top_logprobs == 2 and len(top) == 4
    assert all(len(alternatives) == 2 for alternatives in top)
    assert [max(t, key=t.get) for t in top] == out.choices[0].logprobs.tokens  # the token itself is most likely
    chat = client.chat.completions.create(model="fake-llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert engine.submitted[-1].params.top_logprobs == 3
    assert all([a.logprob for a in t.top_logprobs] == [-0.5, -1.5, -2.5] for t in content)
    # The reply's first word has no leading space (a chat reply starts its own text); the alternative keeps it.
    assert all(t.top_logprobs[0].token == t.token for t in content[1:])


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt_and_max_tokens_0_only_scores(client, engine, tokenizer, stream):
    prompt = "the llama model"
    n_prompt = len(tokenizer.encode(prompt, bos=True, eos=False))
    for max_tokens in (0, 3):
        out = client.completions.create(model="fake-llama", prompt=prompt, max_tokens=max_tokens, echo=True,
                                        logprobs=1, stream=stream)
        choices = [c.choices[0] for c in out] if stream else out.choices
        text = "".join(c.text for c in choices)
        logprobs = [lp for c in choices if c.logprobs for lp in c.logprobs.token_logprobs]
        tops = [t for c in choices if c.logprobs for t in c.logprobs.top_logprobs or []]
        assert engine.submitted[-1].params.prompt_logprobs is True
        assert text.startswith(prompt) and len(logprobs) == n_prompt + max_tokens
        assert logprobs[0] is None and logprobs[1:n_prompt] == [-1.0 - 0.01 * i for i in range(1, n_prompt)]
        assert tops[0] is None and all(len(t) == 1 for t in tops[1:])
        if max_tokens == 0:
            assert text == prompt


def test_logit_bias_reaches_the_engine(client, engine):
    client.completions.create(model="fake-llama", prompt="hi", max_tokens=2, logit_bias={"5": -100, "9": 2.5})
    assert engine.submitted[-1].params.logit_bias == {5: -100.0, 9: 2.5}


def test_an_unknown_model_is_a_404(client, http):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=2)
    assert info.value.status_code == 404 and "gpt-5" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    response = http.post("/tokenize", json={"model": "gpt-5", "prompt": "hi"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_tokenize_and_detokenize(http, tokenizer):
    response = http.post("/tokenize", json={"prompt": "the llama model"})
    tokens = tokenizer.encode("the llama model", bos=True, eos=False)
    assert response.status_code == 200 and response.json() == {"count": len(tokens), "max_model_len": MAX_SEQ_LEN,
                                                                "tokens": tokens}
    bare = http.post("/tokenize", json={"prompt": "the llama model", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokens[1:]
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == format_dialog(tokenizer, [{"role": "user", "content": "hi"}])
    assert http.post("/detokenize", json={"tokens": tokens[1:]}).json() == {"prompt": "the llama model"}
    assert http.post("/detokenize", json={"tokens": [100_000]}).status_code == 400
    assert http.post("/tokenize", json={}).status_code == 400


def test_developer_messages_are_system_messages(client, engine):
    for role in ("developer", "system"):
        client.chat.completions.create(model="fake-llama", max_tokens=1, messages=[
            {"role": role, "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert engine.submitted[-1].prompt_tokens == engine.submitted[-2].prompt_tokens


def test_an_api_key_guards_every_route_but_health_and_metrics(tokenizer):
    server = HttpServer()
    server.start(make_app(FakeEngine(tokenizer), api_key="s3cret"), "127.0.0.1", free_port())
    url = f"http://127.0.0.1:{server.port}"
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=WAIT_S)
        assert keyed.completions.create(model="fake-llama", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        bare = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=WAIT_S)
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/tokenize", json={"prompt": "hi"}, timeout=WAIT_S).status_code == 401
        assert httpx.get(url + "/health", timeout=WAIT_S).status_code == 200
        assert httpx.get(url + "/metrics", timeout=WAIT_S).status_code == 200
    finally:
        assert server.stop(timeout_s=WAIT_S)


def test_engine_metrics_tell_decode_steps_from_prefill_steps():
    from types import SimpleNamespace

    from llama_dist.engine.scheduler import ScheduledChunk

    seq = SimpleNamespace(num_prompt_tokens=5, num_tokens=7, is_finished=False)
    blocks = SimpleNamespace(usage=0.5, queries=0, hits=0)
    scheduler = SimpleNamespace(waiting=[], running=[seq], block_manager=blocks, num_preemptions=0)
    metrics = EngineMetrics()
    metrics.step_done([ScheduledChunk(seq, 5, 1)], 0.1, scheduler)  # the first generated token's step
    metrics.step_done([ScheduledChunk(seq, 0, 5)], 0.2, scheduler)  # a prompt
    metrics.step_done([ScheduledChunk(seq, 4, 1)], 0.3, scheduler)  # a prompt's last token
    assert list(metrics.step_s) == [0.1, 0.2, 0.3] and list(metrics.decode_step_s) == [0.1]


def test_n_choices_share_one_prompt_and_get_their_own_seeds(client, engine):
    out = client.completions.create(model="fake-llama", prompt="hi", max_tokens=3, n=3, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2] and all(c.finish_reason == "length" for c in out.choices)
    first, *others = engine.submitted[-3:]
    assert [r.params.seed for r in engine.submitted[-3:]] == [7, 8, 9]
    assert first.same_prompt_as is None and all(r.same_prompt_as == first.id for r in others)
    assert out.usage.completion_tokens == 9 and out.usage.prompt_tokens == len(first.prompt_tokens)
    chunks = list(client.chat.completions.create(model="fake-llama", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, n=2, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in mine)


# ---- the serving engine's admission, health and shutdown (no model: a stand-in engine) ----------------------

def _serving(slots: int = 2, max_queue: int = 2):
    from types import SimpleNamespace

    from llama_dist.serve.engine_loop import ServingEngine

    engine = SimpleNamespace(metrics=EngineMetrics(), max_seq_len=64, max_num_seqs=slots,
                             check_fits=lambda prompt, max_tokens: None)
    llm = SimpleNamespace(engine=engine, tokenizer=None, model=SimpleNamespace(args=SimpleNamespace(vocab_size=99)),
                          dist=SimpleNamespace(is_main=True))
    return ServingEngine(llm, "m", max_queue=max_queue)


def _request():
    from llama_dist.serve.requests import GenerationRequest

    from llama_dist.engine.sampling_params import SamplingParams

    return GenerationRequest(prompt_tokens=[1, 2], params=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4))


def test_only_requests_beyond_the_free_slots_count_against_the_queue():
    from llama_dist.serve.requests import ServerStopping

    async def scenario():
        serving = _serving(slots=2, max_queue=2)
        for _ in range(4):  # 2 take the free slots at the next step, 2 wait: the queue is full only then
            serving.submit(_request())
        with pytest.raises(ServerBusy) as busy:
            serving.submit(_request())
        assert not isinstance(busy.value, ServerStopping)
        serving.request_shutdown()
        with pytest.raises(ServerStopping):
            serving.submit(_request())
        assert serving.health()["status"] == "stopping"

    asyncio.run(scenario())


def test_health_says_stalled_when_work_waits_on_an_engine_that_does_not_step(monkeypatch):
    from llama_dist.serve import engine_loop

    async def scenario():
        serving = _serving()
        assert serving.health()["status"] == "ok"
        serving.submit(_request())
        assert serving.health()["status"] == "ok"  # pending, but the engine is young
        monkeypatch.setattr(engine_loop, "STALL_S", 0.0)
        time.sleep(0.01)
        assert serving.health()["status"] == "stalled"

    asyncio.run(scenario())


def test_shutdown_is_a_503_with_retry_after(http, engine):
    from llama_dist.serve.requests import ServerStopping

    original = engine.submit

    def stopping(request):
        raise ServerStopping("the server is shutting down")

    engine.submit = stopping
    try:
        response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    finally:
        engine.submit = original
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.json()["error"]["code"] == "shutting_down"


def test_a_body_over_the_limit_is_a_413_and_a_huge_prompt_is_refused_before_tokenizing(http, engine):
    huge = {"prompt": "x" * (5 * 2**20), "max_tokens": 2}  # over the default 4 MB
    response = http.post("/v1/completions", json=huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(6):
            yield b"x" * 2**20
        yield b'"}'

    streamed = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    submitted = len(engine.submitted)
    long = http.post("/v1/completions", json={"prompt": "x" * (32 * MAX_SEQ_LEN + 1), "max_tokens": 2})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 40 * MAX_SEQ_LEN}]})
    assert chat.status_code == 400 and len(engine.submitted) == submitted
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_connections_beyond_max_connections_get_503_and_idle_ones_close(tokenizer):
    import socket

    server = HttpServer(request_timeout_s=1.0, max_connections=3)
    server.start(make_app(FakeEngine(tokenizer)), "127.0.0.1", free_port())
    url = f"http://127.0.0.1:{server.port}"
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) for _ in range(3)]
        time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=WAIT_S).status_code == 503  # a 4th connection's request
        for sock in idle:  # after request_timeout_s without a request: 408, closed
            answer = sock.recv(1024)
            assert answer.startswith(b"HTTP/1.1 408 ") and sock.recv(1024) == b""
            sock.close()
        assert httpx.get(url + "/health", timeout=WAIT_S).status_code == 200
    finally:
        assert server.stop(timeout_s=WAIT_S)
