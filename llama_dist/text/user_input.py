"""What the commands read from the user, on rank 0 before anything loads: prompts, files of prompts or dialogs,
and chat turns typed on stdin. Each mistake is one named error (RequestError, DialogError)."""

from __future__ import annotations

import json
import os
import select
import sys
from pathlib import Path

from llama_dist.errors import DialogError, LlamaDistError, RequestError, TokenizerError
from llama_dist.text.tokenizer_interface import check_text


def read_prompts(prompt, prompts_file) -> list[tuple[str, str]]:
    """(where, text) of each prompt: "--prompt", or the file's line number (blank lines are skipped)."""
    if (prompt is None) == (prompts_file is None):
        raise RequestError("give exactly one of --prompt TEXT or --prompts_file FILE")
    if prompt is not None:
        try:
            check_text(str(prompt))
        except TokenizerError as exc:  # undecodable argv bytes arrive as surrogates
            raise RequestError(f"--prompt: {exc}") from None
        return [("--prompt", str(prompt))]
    path = _file_of("--prompts_file", prompts_file, "a file of prompts", RequestError)
    prompts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = _utf8(raw, f"{path} line {number}", RequestError)
        if line.strip():
            prompts.append((f"{path} line {number}", line))
    if not prompts:
        raise RequestError(f"{path} has no non-empty lines")
    return prompts


def _file_of(flag: str, value, what: str, error: type[LlamaDistError]) -> Path:
    path = Path(value)
    if path.is_dir():
        raise error(f"{flag} {path} is a directory, not {what}")
    return path


def _utf8(raw: bytes, where: str, error: type[LlamaDistError]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where} is not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_dialogs(dialogs_file):
    """The dialogs of --dialogs_file, checked to be a non-empty JSON list of message lists."""
    if not dialogs_file:
        return None
    path = _file_of("--dialogs_file", dialogs_file, "a JSON file of dialogs", DialogError)
    try:
        dialogs = json.loads(_utf8(path.read_bytes(), str(path), DialogError))
    except json.JSONDecodeError as exc:
        raise DialogError(f"{path} is not valid JSON: {exc}") from None
    shape = 'a JSON list of dialogs, each a list of {"role": ..., "content": ...} messages'
    if not isinstance(dialogs, list):
        raise DialogError(f"{path} holds a JSON {type(dialogs).__name__}, not {shape}")
    if not dialogs:
        raise DialogError(f"{path} holds no dialogs: it must be {shape}")
    for i, dialog in enumerate(dialogs):
        if not isinstance(dialog, list) or not all(isinstance(m, dict) for m in dialog):
            raise DialogError(f"{path}: dialog {i} is not a list of messages; the file must be {shape}")
    return dialogs


class StdinLines:
    """Lines typed on rank 0, read so that Ctrl-C always interrupts the wait.

    Python runs signal handlers in the main thread only; a Ctrl-C that the kernel hands to one of torch's threads
    would leave a main thread blocked in input() waiting for ever. Waiting in short select() slices lets it see the
    interrupt within a quarter of a second, whichever thread took the signal.
    """

    def __init__(self, fd: int = 0):
        self.fd, self.pending = fd, b""

    def read_line(self, prompt: str) -> bytes | None:
        """The next line (without its end), or None at the end of input."""
        print(prompt, end="", flush=True)
        while b"\n" not in self.pending:
            if not select.select([self.fd], [], [], 0.25)[0]:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                line, self.pending = self.pending, b""
                return line or None
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.removesuffix(b"\r")


_STDIN = StdinLines()


def read_user_turn() -> str | None:
    while (raw := _STDIN.read_line("user> ")) is not None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            print(f"llama-dist: that line is not valid UTF-8 text ({exc.reason}); type it again", file=sys.stderr)
            continue
        return None if line.strip() in ("exit", "quit") else line
    print(flush=True)  # Ctrl-D ends the input where the prompt is: the shell's prompt goes on a line of its own
    return None
