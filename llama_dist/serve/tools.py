"""Tool calling for chat templates that know tools (Llama 3.1+ and other Hugging Face templates that take `tools`).

The tools go to the template, which writes them into the prompt the way the model was trained to read them. The
model answers a call as Llama 3.1 does: a JSON object {"name": ..., "parameters": {...}} (after `<|python_tag|>`
for its built-in tools, several separated by ";"), which `parse_tool_calls` turns into OpenAI's `tool_calls`.
`tool_choice` "required" or a named function is a grammar (structured output): the reply can only be such a call,
whatever the weights. A stream holds its text back while it may still turn out to be a call (`CallWatch`).
"""

from __future__ import annotations

import json
import uuid

from llama_dist.engine.structured_output import Grammar
from llama_dist.errors import RequestError

PYTHON_TAG = "<|python_tag|>"


def checked_tools(tools: list[dict] | None) -> list[dict]:
    """The request's tools, each {"type": "function", "function": {"name", "parameters"?, "description"?}}."""
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        if not isinstance(function.get("parameters", {}), dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object")
    return list(tools or [])


def chosen_tools(tools: list[dict], tool_choice) -> tuple[list[dict], bool]:
    """(the tools the reply may call, whether it must call one) for `tool_choice`: "auto" (default), "none",
    "required", or {"type": "function", "function": {"name": ...}}."""
    if tool_choice in (None, "auto"):
        return tools, False
    if tool_choice == "none":
        return [], False
    if tool_choice == "required":
        return tools, True
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise RequestError(f"tool_choice must be auto, none, required or a function among tools, got "
                           f"{tool_choice!r:.80}")
    return named, True


def call_grammar(tools: list[dict]) -> Grammar:
    """A reply that is exactly one call of one of `tools`, its parameters valid for the tool's schema."""
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "parameters": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return Grammar("json_schema", json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls}))


def parse_tool_calls(text: str) -> list[dict] | None:
    """OpenAI's tool_calls from a reply that is one or more calls, else None (the reply is text)."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            call, at = decoder.raw_decode(body, at)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("parameters", call.get("arguments", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
        while at < len(body) and body[at] in " \t\n;":
            at += 1
    return calls or None


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI's messages as chat templates read them: a tool call's arguments as a mapping (OpenAI sends a JSON
    string; templates write `arguments | tojson`)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = dict(message, tool_calls=[_template_call(c) for c in calls])
        out.append(message)
    return out


def _template_call(call: dict) -> dict:
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass  # left as the client wrote it
    return dict(call, function=function)


class CallWatch:
    """Decides, as a reply streams in, whether it is a tool call: text is held back while it may still be one
    (nothing but blanks so far, or the start of a JSON object or of <|python_tag|>), and released once it cannot."""

    def __init__(self):
        self.held, self.decided_text = "", False

    def add(self, text: str) -> str:
        """The text that may be sent now."""
        if self.decided_text:
            return text
        self.held += text
        start = self.held.lstrip()
        if not start or start.startswith("{") or start.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(start):
            return ""
        self.decided_text, released, self.held = True, self.held, ""
        return released
