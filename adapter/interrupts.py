"""Stopping a command that writes a new folder whole (merge, quantize_base): SIGTERM (`timeout`, `docker stop`, a
CI job cancelled) ends it as Ctrl-C does, by an exception where the process is, so that the staging folder beside
OUT is removed (formats.common.atomic_folder), and either ends in one line rather than a traceback."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is."""


def stoppable(run: Callable[[], int], kept: str) -> int:
    """`run()`'s exit code; on Ctrl-C or SIGTERM, one line saying `kept` (what stays written) and 128 + the
    signal's number. Off the main thread, SIGTERM is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        return run()

    def terminated(signum: int, frame: object) -> None:
        raise Terminated

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        return run()
    except KeyboardInterrupt as stop:
        print(f"{'terminated' if isinstance(stop, Terminated) else 'interrupted'}: {kept}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, before)
