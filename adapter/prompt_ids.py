"""A prompt is a text, encoded after BOS, or token ids, fed exactly as given (no BOS added): the form clients that
tokenize for themselves send (OpenAI's legacy completions, evaluation harnesses scoring their own tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

Prompt = str | Sequence[int]
Answer = str | Sequence[int]  # an answer's text, or the very tokens decoded


def is_token_ids(prompt: object) -> bool:
    """Whether `prompt` is a (non-text) sequence of plain integers (bools are not ids)."""
    return isinstance(prompt, (list, tuple)) and all(type(token) is int for token in prompt)


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt, vocab_size: int, name: str = "prompt") -> list[int]:
    """The ids the model reads for `prompt`: a text's after BOS, or the ids themselves, checked (ValueError naming
    `name` and the first id at fault)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=True, eos=False)
    if not is_token_ids(prompt) or not prompt:
        raise ValueError(f"{name}: expected a text or a non-empty list of token ids, got {prompt!r:.80}")
    return checked_ids(prompt, vocab_size, name)


def checked_ids(ids: Sequence[int], vocab_size: int, name: str) -> list[int]:
    """`ids` (a list of integers) as a list, each checked to be in the vocabulary (ValueError naming the first)."""
    for place, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name}: token id {token} (place {place}) is not in the vocabulary of {vocab_size}")
    return list(ids)


def prompt_text(tokenizer: Tokenizer, prompt: Prompt) -> str:
    """A prompt as text: itself, or its ids decoded (what an echo returns)."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(list(prompt))
