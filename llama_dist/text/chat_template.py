"""Chat templates: the jinja2 programs Hugging Face tokenizers ship to turn a dialog into prompt text.

Rendered the way transformers' `apply_chat_template` renders them, so a model sees exactly the prompt it was
tuned on: a sandboxed, immutable jinja2 environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` that does not HTML-escape, and the globals templates rely on (`raise_exception`,
`strftime_now`). The variables are `messages`, `add_generation_prompt`, `tools`, `documents` and the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...).

A template is a program from the model's publisher: it runs in jinja2's sandbox, and whatever goes wrong in it
(a syntax error, a `raise_exception` call, a missing variable it indexes) is a DialogError with its message.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_dist.errors import DialogError

__all__ = ["render_chat_template", "checked_template_messages"]


def _raise_exception(message):
    # Templates call this to reject a dialog ("Conversation roles must alternate ..."); the message is theirs.
    raise DialogError(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON (as transformers gives them).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    # Llama 3.x templates put today's date in the system header when this exists.
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which some templates use to mark the assistant's text for
    training masks. A prompt needs no mask, so the block renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise DialogError(f"the chat template is not valid jinja{line}: {e.message or e}") from e


def _plain(value):
    """A copy of `value` made of JSON types only: the sandbox then sees no object with methods of its own
    (a str subclass or a numpy scalar becomes its plain value; anything else an inert "<TypeName>")."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def dialog_messages(dialog) -> list[Mapping]:
    """The messages of a dialog, after checking its shape: a non-empty list of mappings (errors name the index)."""
    if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
        raise DialogError(f"dialog must be a list of messages, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise DialogError("dialog is empty: it needs at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping):
            raise DialogError(f"message {i} must be a dict with 'role' and 'content', got {type(msg).__name__}")
    return list(dialog)


def checked_template_messages(dialog) -> list[dict]:
    """The dialog as plain message dicts; roles and content are the template's to judge, shape is ours."""
    messages = []
    for i, msg in enumerate(dialog_messages(dialog)):
        if not isinstance(msg.get("role"), str):
            raise DialogError(f"message {i} has role {msg.get('role')!r}; a role must be a string")
        # Keys whose value is None are dropped, as transformers does: templates test `'key' in message`, and an
        # API that sends `"tool_calls": null` must render as if the key were absent.
        messages.append({k: _plain(v) for k, v in msg.items() if v is not None})
    return messages


def render_chat_template(
    template: str, dialog, special_tokens: Mapping[str, str], add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> str:
    """The prompt text `template` makes of `dialog`, ending (with add_generation_prompt) where the assistant's
    reply begins. `special_tokens`: the named tokens the template may use, e.g. {"bos_token": "<s>"}. tools: the
    functions the model may call (OpenAI's shape), for templates that show them."""
    compiled = _compiled(template)
    messages = checked_template_messages(dialog)
    try:
        return compiled.render(
            **{name: str(token) for name, token in special_tokens.items()},
            messages=messages,
            tools=[_plain(t) for t in tools] if tools else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
    except DialogError:
        raise
    except jinja2.TemplateError as e:  # includes the sandbox's SecurityError
        raise DialogError(f"the chat template failed: {e.message or e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise DialogError(f"the chat template failed on this dialog: {type(e).__name__}: {e}") from e
