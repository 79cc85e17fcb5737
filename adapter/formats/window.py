"""Mistral's sliding-window attention, as its config files record it (`sliding_window` in config.json and in
params.json, `sliding_window_size` in litgpt's): each token attends to the last `sliding_window` positions
(ModelArgs.sliding_window; the model masks the attention so, adapter.model.Transformer._visible).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ModelArgs


def sliding_window(value: Any, source: Path) -> int | None:
    """A config's attention window (None: full attention), checked; `source` is the file it came from."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(f"{source}: sliding_window must be an integer >= 2 or null, got {value!r}")
    return value


def context_length(window: int | None, recorded: int | None, requested: int | None) -> int | None:
    """The base's max_seq_len: `requested`, else what its config records, else the window (Mistral 7B v0.1's
    params.json records no context; its window is what it was trained on), else None (the model's default)."""
    for length in (requested, recorded, window):
        if length is not None:
            return length
    return None


def windowed_args(make: Callable[..., ModelArgs], source: Path, window: int | None, recorded: int | None,
                  requested: int | None, **values: Any) -> ModelArgs:
    """`make(**values)` given the context (`context_length`) and the window, what every base reader builds its
    ModelArgs with; a bad shape is a ValueError naming `source`, the file it came from."""
    length = context_length(window, recorded, requested)
    if length is not None:
        values["max_seq_len"] = length
    try:
        return make(**values, sliding_window=window)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error
