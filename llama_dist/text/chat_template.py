"""Chat templates: the jinja2 programs Hugging Face tokenizers ship to turn a dialog into prompt text.

Rendered the way transformers' `apply_chat_template` renders them, so a model sees exactly the prompt it was
tuned on: a sandboxed, immutable jinja2 environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` that does not HTML-escape, and the globals templates rely on (`raise_exception`,
`strftime_now`). The variables are `messages`, `add_generation_prompt`, `tools`, `documents` and the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...).

A template is a program from the model's publisher, run on input from any client: it runs in jinja2's sandbox,
within bounds on what one render may do (items in a `range`, the size of a string it repeats, pads or joins, the
size of its output, its time), and whatever goes wrong in it (a syntax error, a `raise_exception` call, a missing
variable it indexes, a bound passed) is a DialogError that names the problem.
"""

from __future__ import annotations

import functools
import json
import re
import string
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_dist.errors import DialogError

__all__ = ["render_chat_template", "checked_template_messages"]

# What one render may do. A prompt is at most a few MB of text: a template asking for more is broken or hostile.
MAX_RANGE = 100_000  # items in one range()
MAX_CHARS = 16 * 2**20  # characters of the output, and of any string or list it builds by repeating or padding
MAX_RENDER_S = 5.0  # seconds one render may take
_WIDTH_METHODS = ("ljust", "rjust", "center", "zfill", "expandtabs")  # str methods whose number is an output size
_PERCENT_WIDTHS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")


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


# ---- bounds on one render ----------------------------------------------------------------------------------------

_render = threading.local()  # this thread's render: its deadline (renders run on the server's worker threads)


def _check_time() -> None:
    if time.monotonic() > getattr(_render, "deadline", float("inf")):
        raise DialogError(f"the chat template ran longer than {MAX_RENDER_S:g} s")


def _check_size(size: int, what: str, unit: str = "items") -> None:
    if size > MAX_CHARS:
        raise DialogError(f"the chat template {what} of {size} {unit} (at most {MAX_CHARS} are allowed)")


def _check_width(value) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        _check_size(value, "asked for a width or count", "characters")


def _check_format(text: str) -> None:
    """Refuse a format string whose field widths or precisions alone would build too large a string."""
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(text) if spec]
    except ValueError:
        specs = []  # not a valid format string: str.format will say so
    numbers = [int(n) for spec in specs for n in re.findall(r"\d+", spec)]
    numbers += [int(n) for match in _PERCENT_WIDTHS.finditer(text) for n in match.groups() if n and n.isdigit()]
    for number in numbers:
        _check_width(number)


def _bounded_range(*args) -> range:
    try:
        items = range(*args)
        size = len(items)
    except OverflowError:
        size = MAX_RANGE + 1
    if size > MAX_RANGE:
        raise DialogError(f"the chat template asked for a range of more than {MAX_RANGE} items")
    return items


def _bounded_join(parts) -> str:
    """`~` (jinja's string concatenation), its result's size checked."""
    parts = [str(part) for part in parts]
    _check_size(sum(map(len, parts)), "built a string")
    return "".join(parts)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with the bounds above on repetition, padding, formatting and time."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def call_binop(self, context, operator, left, right):
        _check_time()
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                    _check_size(len(sequence) * count, "built a string or list")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            _check_size(left.bit_length() * right // 8, "built a number", "bytes")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        _check_time()
        if getattr(__obj, "__name__", None) in _WIDTH_METHODS and isinstance(getattr(__obj, "__self__", None), str):
            for value in (*args, *kwargs.values()):
                _check_width(value)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_time()
        if attribute in ("format", "format_map") and isinstance(obj, str):
            _check_format(obj)
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_time()
        return super().getitem(obj, argument)


def _bounded_filter(name: str, fn):
    """A builtin filter whose numeric arguments (widths, counts) are bounded; `format`'s format string too."""

    @functools.wraps(fn)
    def bounded(*args, **kwargs):
        _check_time()
        for value in (*args, *kwargs.values()):
            _check_width(value)
            if name == "format" and isinstance(value, str):
                _check_format(value)
        return fn(*args, **kwargs)

    return bounded


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    for name in ("center", "indent", "batch", "slice", "format", "wordwrap", "truncate"):
        env.filters[name] = _bounded_filter(name, env.filters[name])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _bounded_range
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise DialogError(f"the chat template is not valid jinja{line}: {e.message or e}") from e
    # `~` compiles to a call of the module's str_join, which no sandbox hook sees: the bounded one takes its place.
    compiled.root_render_func.__globals__["str_join"] = _bounded_join
    return compiled


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
    _render.deadline = time.monotonic() + MAX_RENDER_S
    try:
        pieces, size = [], 0
        for piece in compiled.generate(
            **{name: str(token) for name, token in special_tokens.items()},
            messages=messages,
            tools=[_plain(t) for t in tools] if tools else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        ):
            pieces.append(piece)
            size += len(piece)
            if size > MAX_CHARS:
                raise DialogError(f"the chat template's output passed {MAX_CHARS} characters")
            _check_time()
        return "".join(pieces)
    except DialogError:
        raise
    except jinja2.TemplateError as e:  # includes the sandbox's SecurityError
        raise DialogError(f"the chat template failed: {e.message or e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
            RecursionError, MemoryError) as e:
        raise DialogError(f"the chat template failed on this dialog: {type(e).__name__}: {e}") from e
    finally:
        _render.deadline = float("inf")
