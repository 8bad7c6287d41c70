"""Incremental detokenizing: generated token ids -> the text as it grows, and which part of it may be released yet.

Two things make this more than decoding all tokens at each step:
- a character may span tokens (byte-fallback pieces, byte-level BPE): until it is complete the decoded text ends in
  U+FFFD, which must not reach the client;
- a `stop` string may span tokens: text that could be the start of one is held back until it either completes (the
  completion then ends before it) or no longer can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llama_dist.text.tokenizer_interface import TokenizerInterface

__all__ = ["IncrementalDecoder", "GeneratedToken", "CompletionText"]

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Decodes tokens one at a time such that the pieces joined equal `decode(all tokens)`, in time linear in the
    length. Each step decodes a short window that starts at a token whose text was already complete and keeps what
    lies past the window's earlier text: a window decoded alone may differ at its start (SentencePiece drops a
    leading space), but it differs alike with and without the new tokens."""

    def __init__(self, tokenizer: TokenizerInterface, context: Sequence[int] = ()):
        """`context`: tokens before the first one added (the end of a prompt), whose text is not returned but
        shapes the next text: SentencePiece spells a word's leading space only after other text."""
        self._tokenizer = tokenizer
        context = list(context)
        if context and tokenizer.decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # it ends inside a character: the first new text would lose that character's start
        self._ids: list[int] = context
        self._window_start = 0
        self._decoded = len(context)  # self._ids[:_decoded] have been turned into text

    def add(self, token: int) -> str:
        """The text `token` completes ("" while a character is still incomplete)."""
        self._ids.append(token)
        return self._new_text(final=False)

    def flush(self) -> str:
        """Whatever is left, an incomplete character included (the generation ended inside it)."""
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        if self._decoded == len(self._ids):
            return ""
        before = self._tokenizer.decode(self._ids[self._window_start:self._decoded])
        after = self._tokenizer.decode(self._ids[self._window_start:])
        if not final and after.endswith(REPLACEMENT_CHAR):
            return ""
        self._window_start, self._decoded = self._decoded, len(self._ids)
        return after[len(before):]


@dataclass
class GeneratedToken:
    text: str  # the text this token completed ("" when a later token completed its character)
    logprob: float | None
    offset: int  # where `text` starts in the completion
    top: list[tuple[str, float]] | None = None  # the most likely tokens' texts and log-probabilities, when asked


class CompletionText:
    """The completion of one request: its text, its tokens, and how much of the text has been released.
    `context`: as for IncrementalDecoder.

    Joined, the tokens' texts are always `text`. Once a stop string is found (`stopped`), `text` ends before it and
    nothing more may be added.
    """

    def __init__(self, tokenizer: TokenizerInterface, stop: Sequence[str] = (), context: Sequence[int] = ()):
        self._decoder = IncrementalDecoder(tokenizer, context)
        self._stops = [s for s in stop if s]
        self.text = ""
        self.tokens: list[GeneratedToken] = []
        self.stopped = False
        self._ended = False
        self._released_chars = 0
        self._released_tokens = 0

    def add(self, token: int, logprob: float | None = None, top: list[tuple[str, float]] | None = None) -> None:
        assert not (self.stopped or self._ended), "the completion has ended"
        piece = self._decoder.add(token)
        self.tokens.append(GeneratedToken(piece, logprob, len(self.text), top))
        self._append(piece)

    def end(self) -> None:
        """The generation is over: release everything, an incomplete last character included."""
        if not self.stopped and not self._ended:
            piece = self._decoder.flush()
            if piece and self.tokens:
                self.tokens[-1].text += piece
                self._append(piece)
        self._ended = True

    def release(self) -> tuple[str, list[GeneratedToken]]:
        """The text that may be sent now, and the tokens whose text it completes."""
        end = len(self.text)
        if not (self.stopped or self._ended):
            end -= self._possible_stop_start()
        text = self.text[self._released_chars:max(end, self._released_chars)]
        self._released_chars += len(text)
        first = n = self._released_tokens
        while n < len(self.tokens) and self.tokens[n].offset + len(self.tokens[n].text) <= self._released_chars:
            n += 1
        self._released_tokens = n
        return text, self.tokens[first:n]

    def _append(self, piece: str) -> None:
        searched_before = max(0, len(self.text) - max((len(s) for s in self._stops), default=0) + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, searched_before) for s in self._stops) if i >= 0]
        if found:
            self._cut(min(found))

    def _cut(self, at: int) -> None:
        self.stopped = True
        self.text = self.text[:at]
        # The stop string is no part of the completion, so neither are the tokens that only spell it (but a token
        # already sent stays, with no text).
        kept = max(self._released_tokens, sum(1 for t in self.tokens if t.offset < at))
        del self.tokens[kept:]
        for token in self.tokens:
            token.offset = min(token.offset, at)
            token.text = token.text[:at - token.offset]

    def _possible_stop_start(self) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
