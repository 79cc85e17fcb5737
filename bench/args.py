"""Argument types the benchmarks' command lines share: a bad number is argparse's one-line error, not a traceback
from deep inside a run."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number of at least 1 (threads, rounds, steps, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated whole numbers of at least 1 ("512,2048")."""
    return [positive_int(word.strip()) for word in text.split(",")]
