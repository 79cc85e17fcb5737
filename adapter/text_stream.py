"""Turning generated token ids into text pieces for streaming.

A piece never ends inside a multi-byte character (byte-fallback tokens decode to U+FFFD until the
character is complete) and never shows the beginning of a stop string that may still complete.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_IDS = 8  # of a continuation's prompt, decoded before its text: a character's bytes at either edge and more


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), context: Sequence[int] = ()) -> None:
        """`context`: the ids before the generated ones (a raw continuation's prompt), decoded with them so that
        the text reads as it goes on: SentencePiece drops the space a text starts with (" large" -> "large"). A
        character whose first bytes end the context and whose last ones are generated is the text's first."""
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.context = [int(i) for i in context[-CONTEXT_IDS:]]
        self.lead = tokenizer.decode(self.context) if self.context else ""
        while REPLACEMENT in self.lead.rstrip(REPLACEMENT):  # a character cut at the context's start: after it
            self.context = self.context[1:]
            self.lead = tokenizer.decode(self.context) if self.context else ""
        self.lead = self.lead.rstrip(REPLACEMENT)  # a character cut at its end, which the continuation completes
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now safe to show (may be empty)."""
        self.ids.append(int(token_id))
        text = self._decoded()
        cut = self._stop_position(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        safe = text.rstrip(REPLACEMENT)
        return self._emit(safe[: len(safe) - self._open_stop_prefix(safe)])

    def finish(self) -> str:
        """The rest of the text once generation has ended (EOS or length)."""
        if self.stopped:
            return ""
        text = self._decoded()
        cut = self._stop_position(text)
        return self._emit(text if cut is None else text[:cut])

    @property
    def text(self) -> str:
        return self.emitted

    def _decoded(self) -> str:
        text = self.tokenizer.decode([*self.context, *self.ids])
        return text[len(self.lead):] if text.startswith(self.lead) else self.tokenizer.decode(self.ids)

    def _emit(self, text: str) -> str:
        """What `text` adds to the text shown. A decode that rewrote text already shown (HF's byte fallback turns
        a whole run of bytes that is not UTF-8 into U+FFFD, an ASCII byte in it too) goes on from the length shown
        (it showed nothing more)."""
        if len(text) <= len(self.emitted):
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece

    def _stop_position(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def _open_stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
