"""Keeping torch's parallel CPU work off a server's main thread.

torch runs its CPU operations through OpenMP. With GNU OpenMP (the libgomp of torch's Linux wheels), once the
process's main thread has run a parallel region, the parallel regions of every other thread run several times
slower: their OpenMP workers fall asleep between operations and each operation waits for them to wake. A server
answers on worker threads (gradio's, uvicorn's thread pool) and the app trains on a thread of its own, so whatever
the main thread does first, loading the model above all, sets how fast every answer is. Measured on 2 cores with
the tiny model (`python -m bench.threads`): greedy decoding on a worker thread at a third of the main thread's
rate when the main thread loaded the model, and at the main thread's own rate when a helper thread did.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def off_the_main_thread(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`work(*args, **kwargs)` run on a thread of its own, its result returned (its error raised) here. The thread
    is a daemon, so Ctrl-C during a long load ends the process instead of waiting for it."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work(*args, **kwargs)
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"off-main:{getattr(work, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
