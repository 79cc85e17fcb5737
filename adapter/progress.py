"""A progress bar for work that takes minutes on a real base (loading or writing a 7B base, evaluating hundreds of
questions) and a moment on the tiny one: shown in a terminal only, once the work has taken more than a moment, and
gone when it is done, so that logs, tests and quick runs see nothing."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TypeVar

from tqdm import tqdm

BAR_DELAY_S = 2.0  # work done within this shows no bar
T = TypeVar("T")


def terminal_progress(items: Sequence[T], shown: str, unit: str) -> Iterable[T]:
    """`items`, with a bar on stderr where stderr is a terminal and going through them takes more than
    BAR_DELAY_S; none in a log file or in a torchrun job's other processes (the first one's is enough)."""
    quiet = None if os.environ.get("RANK", "0") == "0" else True
    return tqdm(items, desc=shown, unit=unit, delay=BAR_DELAY_S, leave=False, disable=quiet)
