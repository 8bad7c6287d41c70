"""Tool calling end to end: a real server (1 process, and 2 ranks under torchrun) over a random checkpoint whose
Hugging Face chat template takes tools, asked through the official `openai` client: a forced call comes back as
`tool_calls` with valid arguments, the tool's answer goes back as a `tool` message, a named function is the one
called, streaming gives the same calls; the bundled checkpoint (Llama 2's chat format, no tools) answers 400."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
pytest.importorskip("transformers", reason="transformers writes the test's Hugging Face tokenizer")
pytest.importorskip("llguidance", reason="llguidance (the grammar library) not installed")
jsonschema = pytest.importorskip("jsonschema")

from hf_tokenizer import write_hf_checkpoint  # noqa: E402

from llama_dist.bench.serve import ServerProcess  # noqa: E402

# Llama 3.1's way, cut short: the tools in a system turn, a call as {"name", "parameters"} JSON, a tool's answer in
# an ipython turn.
TOOL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nFunctions: {{ tools | tojson }}<|eot_id|>"
    "{%- endif %}"
    "{%- for m in messages %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
    "{%- if m.tool_calls %}{{ {'name': m.tool_calls[0].function.name, "
    "'parameters': m.tool_calls[0].function.arguments} | tojson }}"
    "{%- else %}{{ m.content }}{%- endif %}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Oslo"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_ckpt(tmp_path_factory) -> str:
    return str(write_hf_checkpoint(tmp_path_factory, "toolmodel", TOOL_TEMPLATE, seed=2))


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def client(request, tool_ckpt, tmp_path_factory):
    flags = ["--ckpt_dir", tool_ckpt, "--max_batch_size", "2", "--max_seq_len", "1024", "--dtype", "float32"]
    server = ServerProcess(request.param, flags, tmp_path_factory.mktemp("serve_tools"),
                           env={"OMP_NUM_THREADS": "1", "LLAMA_DIST_TIMEOUT": "120"}, start_timeout_s=120)
    yield openai.OpenAI(base_url=server.url, api_key="none", timeout=120, max_retries=0)
    server.kill()


def _arguments(call, tool) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_a_required_call_round_trip(client):
    first = client.chat.completions.create(model="toolmodel", messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice="required", temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    tool = WEATHER if call.function.name == "get_weather" else TIME
    _arguments(call, tool)
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": "sunny"})},
    ]
    answer = client.chat.completions.create(model="toolmodel", messages=history, tools=[WEATHER, TIME],
                                            tool_choice="none", temperature=0, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.tool_calls is None


def test_a_named_function_is_the_one_called_streamed_or_not(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = client.chat.completions.create(model="toolmodel", messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice=named, temperature=1.0, seed=4, max_tokens=80)
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and _arguments(call, TIME)["zone"] in ("UTC", "CET")
    chunks = list(client.chat.completions.create(model="toolmodel", messages=QUESTION, tools=[WEATHER, TIME],
                                                 tool_choice=named, temperature=1.0, seed=4, max_tokens=80,
                                                 stream=True))
    deltas = [c.choices[0] for c in chunks if c.choices]
    streamed = [t for d in deltas if d.delta.tool_calls for t in d.delta.tool_calls]
    assert not "".join(d.delta.content or "" for d in deltas)  # nothing of the call leaked as text
    assert [t.function.name for t in streamed] == ["get_time"]
    assert streamed[0].function.arguments == call.function.arguments and deltas[-1].finish_reason == "tool_calls"


def test_auto_lets_the_model_answer_in_text(client):
    reply = client.chat.completions.create(model="toolmodel", messages=QUESTION, tools=[WEATHER], temperature=0,
                                           max_tokens=6)
    message = reply.choices[0].message
    assert (message.tool_calls is None) == (message.content is not None)  # text, or calls: never both
