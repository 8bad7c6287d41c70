"""Dialog -> prompt token ids, in the exact layouts Meta's Llama 2 and Llama 3 chat models were tuned on, or
through the chat template a Hugging Face tokenizer ships (see `chat_template`).

The returned ids end where the assistant's reply should begin, so they can go straight to `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from llama_dist.errors import DialogError
from llama_dist.text.chat_template import dialog_messages, render_chat_template
from llama_dist.text.tokenizer import TokenizerInterface

__all__ = ["Message", "Dialog", "DialogError", "format_dialog", "supports_tools"]


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant" (Llama 3 also "ipython", alias "tool")
    content: str


Dialog = Sequence[Message]


# Llama 2 markers, from Meta's llama 2 `chat_completion`.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

LLAMA2_ROLES = ("system", "user", "assistant")
# Meta's tool-result role is "tool" in its API but "ipython" in the header text.
LLAMA3_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython"}


def _checked_messages(dialog: Dialog, allowed_roles) -> list[tuple[str, str]]:
    """(role, content) pairs, after checking shape and types; errors name the message index."""
    pairs = []
    for i, msg in enumerate(dialog_messages(dialog)):
        role, content = msg.get("role"), msg.get("content")
        if role not in allowed_roles:
            raise DialogError(f"message {i} has role {role!r}; allowed roles are {sorted(allowed_roles)}")
        if not isinstance(content, str):
            raise DialogError(f"message {i} content must be a str, got {type(content).__name__}: {content!r:.80}")
        pairs.append((role, content))
    return pairs


def _format_llama3(tokenizer: TokenizerInterface, dialog: Dialog) -> list[int]:
    messages = _checked_messages(dialog, LLAMA3_ROLES)
    start_header = tokenizer.encode_special("<|start_header_id|>")
    end_header = tokenizer.encode_special("<|end_header_id|>")
    eot = tokenizer.encode_special("<|eot_id|>")

    def header(role: str) -> list[int]:
        # Role and "\n\n" are encoded separately, as Meta does: encoding them together would merge
        # differently and the model would see a header it was never trained on.
        return [start_header, *tokenizer.encode(role, bos=False, eos=False), end_header,
                *tokenizer.encode("\n\n", bos=False, eos=False)]

    ids = [tokenizer.bos_id]
    for role, content in messages:
        ids += header(LLAMA3_ROLES[role])
        ids += tokenizer.encode(content.strip(), bos=False, eos=False)
        ids.append(eot)
    ids += header("assistant")  # left open for the model to write the reply
    return ids


def _format_llama2(tokenizer: TokenizerInterface, dialog: Dialog) -> list[int]:
    messages = _checked_messages(dialog, LLAMA2_ROLES)
    first = 0
    if messages[0][0] == "system":
        if len(messages) < 2:
            raise DialogError("message 0 is a system message but no user message follows it")
        first = 1
    # After an optional leading system message: user, assistant, user, ..., user.
    for i in range(first, len(messages)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if messages[i][0] != expected:
            raise DialogError(
                f"message {i} has role {messages[i][0]!r} but {expected!r} was expected: Llama 2 dialogs are "
                "an optional system message, then alternating user/assistant turns starting with user"
            )
    if messages[-1][0] != "user":
        raise DialogError(f"message {len(messages) - 1} has role 'assistant'; the last message must be from the user")

    turns = [content for _, content in messages[first:]]
    if first:
        # Llama 2 has no system turn: the system prompt rides inside the first user message.
        turns[0] = B_SYS + messages[0][1] + E_SYS + turns[0]

    ids: list[int] = []
    for user, answer in zip(turns[0:-1:2], turns[1::2]):
        ids += tokenizer.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {turns[-1].strip()} {E_INST}", bos=True, eos=False)
    return ids


def _format_with_template(tokenizer: TokenizerInterface, dialog: Dialog, tools: list[dict] | None = None) -> list[int]:
    # As transformers' apply_chat_template(add_generation_prompt=True, tokenize=True): the template writes every
    # special token itself (BOS included, if the model wants one), so nothing is added to its text.
    text = render_chat_template(tokenizer.chat_template, dialog, tokenizer.template_tokens, tools=tools)
    ids = tokenizer.encode_template_output(text)
    if not ids:
        raise DialogError("the chat template rendered this dialog as empty text")
    return ids


def supports_tools(tokenizer) -> bool:
    """Whether the checkpoint's chat format can show tools to the model: a chat template that reads `tools`."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def format_dialog(tokenizer: TokenizerInterface, dialog: Dialog, tools: list[dict] | None = None) -> list[int]:
    """Prompt ids for `dialog`: through the tokenizer's chat template when it has one, else in the built-in
    format of `tokenizer.family` (Meta's tokenizers, and Hugging Face ones that ship no template). tools: the
    functions the model may call, for a template that shows them (DialogError for any other format)."""
    if tools and not supports_tools(tokenizer):
        raise DialogError("this checkpoint's chat format has no place for tools: tool calling needs a chat template "
                          "that takes them (Llama 3.1+ tokenizer_config.json)")
    if tokenizer.chat_template is not None:
        return _format_with_template(tokenizer, dialog, tools)
    if tokenizer.family == "llama3":
        return _format_llama3(tokenizer, dialog)
    if tokenizer.family == "llama2":
        return _format_llama2(tokenizer, dialog)
    raise DialogError(
        f"no chat format for tokenizer family {tokenizer.family!r} (expected 'llama2' or 'llama3') and the tokenizer "
        "has no chat template"
    )
