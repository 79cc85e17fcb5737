"""Mistral's sliding-window attention, as its config files record it (`sliding_window` in config.json and in
params.json): each token attends to the last `sliding_window` positions. Within one window that is plain
causal attention, which is what the model computes, so a base with a window gets the window as its longest
context rather than a silently different attention beyond it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sliding_window(value: Any, source: Path) -> int | None:
    """A config's attention window (None: full attention), checked; `source` is the file it came from."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(f"{source}: sliding_window must be an integer >= 2 or null, got {value!r}")
    return value


def context_length(window: int | None, recorded: int | None, requested: int | None, source: Path) -> int | None:
    """The base's max_seq_len: `requested` (refused beyond the window), else what its config records capped at
    the window (None: the model's default, or the window when there is one)."""
    if requested is not None:
        if window is not None and requested > window:
            raise ValueError(f"{source}: max_seq_len={requested} is longer than sliding_window={window}; attention "
                             "over a sliding window is not implemented, so the context ends at the window")
        return requested
    if window is None:
        return recorded
    return window if recorded is None else min(recorded, window)
