"""Tool calling's pieces: parsing a reply into tool_calls, holding a stream back while it may be a call, choosing
the tools, and the grammar that forces a call (valid for the tool's parameters whatever the weights)."""

import json

import pytest
import torch

from llama_dist.engine.structured_output import GrammarCompiler
from llama_dist.errors import RequestError
from llama_dist.serve.tools import (
    CallWatch,
    call_grammar,
    checked_tools,
    chosen_tools,
    parse_tool_calls,
    template_messages,
)
from llama_dist.text.chat import supports_tools
from llama_dist.text.tokenizer import load_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_replies_that_are_calls_become_tool_calls():
    calls = parse_tool_calls(' {"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}')
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and calls[0]["type"] == "function"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert calls[0]["id"].startswith("call_")
    two = parse_tool_calls('<|python_tag|>{"name": "a", "arguments": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert [c["function"]["name"] for c in two] == ["a", "b"] and two[1]["function"]["arguments"] == '{"x": 1}'
    for text in ("It is sunny.", '{"name": 3}', '{"city": "Paris"}', '{"name": "a", "parameters": {', ""):
        assert parse_tool_calls(text) is None, text


def test_a_stream_is_held_back_only_while_it_may_be_a_call():
    watch = CallWatch()
    assert watch.add("  ") == "" and watch.add("It") == "  It" and watch.add(" is") == " is"
    call = CallWatch()
    assert call.add("{") == "" and call.add('"name"') == "" and call.held == '{"name"'
    tagged = CallWatch()
    assert tagged.add("<|python") == "" and tagged.add("_tag|>{") == ""
    assert CallWatch().add("<|eot") == "<|eot"  # not the start of the tag


def test_tool_choice_picks_the_tools_and_whether_a_call_is_forced():
    tools = checked_tools([WEATHER, TIME])
    assert chosen_tools(tools, None) == (tools, False) and chosen_tools(tools, "auto") == (tools, False)
    assert chosen_tools(tools, "none") == ([], False) and chosen_tools(tools, "required") == (tools, True)
    assert chosen_tools(tools, {"type": "function", "function": {"name": "get_time"}}) == ([TIME], True)
    with pytest.raises(RequestError, match="tool_choice"):
        chosen_tools(tools, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(RequestError, match=r"tools\[0\]"):
        checked_tools([{"type": "function", "function": {}}])


def test_history_calls_reach_templates_with_their_arguments_as_mappings():
    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]}]
    assert template_messages(history)[0]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}
    assert history[0]["tool_calls"][0]["function"]["arguments"] == '{"zone": "UTC"}'  # the request is left alone


@pytest.mark.parametrize("tools", [[WEATHER], [WEATHER, TIME]])
def test_a_forced_call_is_always_a_valid_call(spm_model_path, tools):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    tokenizer = load_tokenizer(spm_model_path)
    compiler = GrammarCompiler(tokenizer, tokenizer.n_words)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        guide, tokens = compiler.guide(call_grammar(tools)), []
        for _ in range(120):
            ids = guide.allowed().nonzero().flatten().tolist()
            ids = [i for i in ids if i not in tokenizer.stop_tokens]
            if not ids:
                break
            tokens.append(ids[torch.randint(len(ids), (1,), generator=generator).item()])
            guide.consume(tokens[-1])
            if guide.finished:
                break
        calls = parse_tool_calls(tokenizer.decode(tokens))
        assert calls is not None and len(calls) == 1
        tool = next(t for t in tools if t["function"]["name"] == calls[0]["function"]["name"])
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), tool["function"]["parameters"])


def test_only_templates_that_read_tools_support_them():
    class Tok:
        chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    assert not supports_tools(Tok()) and not supports_tools(object())
    Tok.chat_template += "{{ tools }}"
    assert supports_tools(Tok())
