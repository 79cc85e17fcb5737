"""Stopping a command that writes a new folder whole (merge, quantize_base): SIGTERM (`timeout`, `docker stop`, a
CI job cancelled) ends it as Ctrl-C does, by an exception where the process is, so that the staging folder beside
OUT is removed (formats.common.atomic_folder), and either ends in one line rather than a traceback, as a refusal
(ValueError, OSError) does."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .arg_types import refused


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is."""


def stoppable(run: Callable[[], object], kept: str, parser: argparse.ArgumentParser) -> int:
    """The exit code of a command that `run()` carries out: 0 when it returns; on a ValueError or OSError (a
    refusal), `error: ...` in one line naming the flag of `parser` at fault (arg_types.refusal) and 2; on Ctrl-C
    or SIGTERM, one line saying `kept` (what stays written) and 128 + the signal's number. Off the main thread,
    SIGTERM is left as it is."""
    try:
        with terminated_raises():
            return _refusals(run, parser)
    except KeyboardInterrupt as stop:
        print(f"{'terminated' if isinstance(stop, Terminated) else 'interrupted'}: {kept}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


@contextmanager
def terminated_raises() -> Iterator[None]:
    """Within it, SIGTERM raises Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt (by default it
    ended the process at once: no `finally`, no exit handler ran); off the main thread, SIGTERM is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise Terminated

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _refusals(run: Callable[[], object], parser: argparse.ArgumentParser) -> int:
    try:
        run()
    except (ValueError, OSError) as error:
        return refused(error, parser)
    return 0
