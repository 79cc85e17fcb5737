"""One example as token ids and labels, as the official recipe builds them.

The prompt and the response are tokenized together (`encode(prompt + response)`, BOS first, the answer end
appended: EOS, or the prompt format's own end such as Llama 3's <|eot_id|>), then the first
`len(encode(prompt))` labels are ignored: the loss is on the response and its end only.
Positions that hold no target (prompt, padding) carry IGNORE_INDEX, never a real token id. A document of plain
text has no prompt: all of it is the target, in windows of the run's length rather than cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..tokenizer import Tokenizer
from .records import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    tokens: list[int]
    labels: list[int]  # labels[t] is the target of the logits at t - 1 (shifted in the loss)
    image: Path | None = None

    @property
    def targets(self) -> int:
        """How many positions the loss is taken on."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def encode_example(example: Example, tokenizer: Tokenizer, max_seq_len: int,
                   answer_end: int | None = None) -> tuple[Encoded, bool]:
    """(tokens and labels cut to `max_seq_len`, whether anything was cut off); `answer_end` ends the response
    (default: the tokenizer's EOS)."""
    end = tokenizer.eos_id if answer_end is None else answer_end
    tokens = tokenizer.encode(example.prompt + example.response, bos=True, eos=False) + [end]
    prompt_len = min(len(tokenizer.encode(example.prompt, bos=True, eos=False)), len(tokens))
    labels = [IGNORE_INDEX] * prompt_len + tokens[prompt_len:]
    truncated = len(tokens) > max_seq_len
    return Encoded(tokens[:max_seq_len], labels[:max_seq_len], example.image), truncated


def encode_text(example: Example, tokenizer: Tokenizer, max_seq_len: int) -> list[Encoded]:
    """A document of plain text (`example.plain`) after BOS and ended by EOS, in windows of `max_seq_len`
    (text_windows): nothing cut, every token after BOS a target once."""
    tokens = tokenizer.encode(example.response, bos=True, eos=False) + [tokenizer.eos_id]
    return [Encoded(window.tokens, window.labels, example.image) for window in text_windows(tokens, max_seq_len)]


def encoded_examples(example: Example, tokenizer: Tokenizer, max_seq_len: int,
                     answer_end: int | None = None) -> tuple[list[Encoded], bool]:
    """What one example trains on: a plain-text document's windows, or the one sequence of a prompt and its
    response (cut to `max_seq_len`); and whether anything was cut off."""
    if example.plain:
        return encode_text(example, tokenizer, max_seq_len), False
    encoded, truncated = encode_example(example, tokenizer, max_seq_len, answer_end)
    return [encoded], truncated


def text_windows(tokens: list[int], length: int, stride: int | None = None) -> list[Encoded]:
    """A document's tokens (BOS first) in windows of at most `length`, each starting `stride` tokens after the last
    (default `length` - 1: windows overlapping by one) and scored on the tokens no earlier window scored: every
    token but the document's first is scored once, after at least `length` - `stride` tokens of its document (all
    before it, in the first window). A smaller stride reads each token after more context, in more windows."""
    stride = length - 1 if stride is None else stride
    windows, scored_to = [], 1  # the document's first token (BOS) is never a target
    for start in range(0, max(len(tokens) - 1, 0), stride):
        window = tokens[start:start + length]
        labels = [IGNORE_INDEX if start + i < scored_to or i == 0 else token for i, token in enumerate(window)]
        windows.append(Encoded(window, labels))
        scored_to = start + len(window)
        if scored_to >= len(tokens):
            break
    return windows
