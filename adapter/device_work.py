"""Where a device's model work runs: one request at a time under the device's lock, and in a server on one thread.

Two models on one device never compute at the same time: every piece of model work holds the device's lock
(`device_lock`). By default it runs on the thread that asks for it. A server starts a compute thread for its
device (`start_compute_thread`) and then every piece of work runs there, the model's loading included, because
torch runs its CPU work through OpenMP and, with GNU OpenMP (torch's Linux wheels), once the main thread or several
live threads have run parallel regions, each thread's parallel regions run several times slower: their workers
fall asleep between operations and every operation waits for a wake-up. gradio and uvicorn answer on pools of
worker threads (a streamed answer's steps on whichever is free), so without this a served model computes at that
slow rate (`python -m bench.compute_thread`, 2 cores: the tiny model's continuations at 522 tokens/s on the worker
that asks, 717 on the compute thread, 768 with everything on the main thread; its Train-tab steps 1.3x faster).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_LOCKS: dict[str, threading.Lock] = {}
_THREADS: dict[str, _ComputeThread] = {}
_GUARD = threading.Lock()
_END = object()


def _key(device: str | torch.device) -> str:
    """A device's name with its index ("cuda" is the current GPU, as tensors placed there say)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def device_lock(device: str | torch.device) -> threading.Lock:
    """The one lock of a device: two models on one GPU (or the CPU) never compute at the same time.

    A plain Lock, not an RLock: gradio runs each step of a streamed answer in whichever worker thread is
    free, so the thread that releases it may not be the one that acquired it.
    """
    with _GUARD:
        return _LOCKS.setdefault(_key(device), threading.Lock())


def start_compute_thread(device: str | torch.device) -> None:
    """From now on, run all of `device`'s work (DeviceWork) on one thread of its own (a server calls this before
    loading its model)."""
    key = _key(device)
    with _GUARD:
        if key not in _THREADS:
            _THREADS[key] = _ComputeThread(key)


class DeviceWork:
    """How one model's work runs: holding `lock` (its device's, unless a test gives its own), on the calling thread,
    or on the device's compute thread once it has one."""

    def __init__(self, device: str | torch.device, lock: threading.Lock | None = None) -> None:
        self.key = _key(device)
        self.lock = lock if lock is not None else device_lock(self.key)

    def run(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`work(*args, **kwargs)`, its result or its error."""
        thread = _THREADS.get(self.key)
        if thread is None:
            with self.lock:
                return work(*args, **kwargs)
        if thread.is_current():  # work within work: the lock is held already
            return work(*args, **kwargs)
        return thread.call(self.lock, lambda: work(*args, **kwargs))

    def stream(self, make: Callable[[], Iterator[T]]) -> Iterator[T]:
        """The items of the iterator `make()` returns, computed holding the lock (on the compute thread, running
        ahead of the reader). Closing this stops the work after the item under way and frees the device."""
        thread = _THREADS.get(self.key)
        if thread is None or thread.is_current():
            with self.lock if thread is None else nullcontext(), _closing(make()) as items:  # nested: held already
                yield from items
            return
        yield from thread.stream(self.lock, make)


class _ComputeThread:
    """A daemon thread that runs the jobs handed to it one after another, each holding its work's lock (so that a
    caller holding that lock, as tests do, keeps the device busy for it)."""

    def __init__(self, key: str) -> None:
        self.jobs: queue.SimpleQueue[tuple[threading.Lock, Callable[[], None]]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=f"compute:{key}", daemon=True)
        self.thread.start()

    def is_current(self) -> bool:
        return threading.current_thread() is self.thread

    def _serve(self) -> None:
        while True:
            lock, job = self.jobs.get()
            with lock:
                job()
            del job  # held until the next job, it would keep the model of the last one's work alive

    def call(self, lock: threading.Lock, work: Callable[[], T]) -> T:
        done: Future = Future()

        def job() -> None:
            try:
                done.set_result(work())
            except BaseException as error:  # handed to the caller
                done.set_exception(error)

        self.jobs.put((lock, job))
        return done.result()

    def stream(self, lock: threading.Lock, make: Callable[[], Iterator[T]]) -> Iterator[T]:
        """Item by item as the reader asks (as the iterator would run on the reader's thread: a closed reader
        leaves no work running, and the lock is free when its close returns)."""
        asks: queue.SimpleQueue[bool] = queue.SimpleQueue()
        items: queue.SimpleQueue = queue.SimpleQueue()

        def job() -> None:
            try:
                with _closing(make()) as produced:
                    while asks.get() and (item := next(produced, _END)) is not _END:
                        items.put(item)
            except BaseException as error:  # handed to the reader
                items.put(_Failed(error))
            finally:
                items.put(_END)

        self.jobs.put((lock, job))
        ended = False
        try:
            while True:
                asks.put(True)
                item = items.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, _Failed):
                    ended = True
                    raise item.error
                yield item
        finally:
            if not ended:  # closed early: stop the work and wait until it has let the device go
                asks.put(False)
                while items.get() is not _END:
                    pass


@contextmanager
def _closing(items: Iterator[T]) -> Iterator[Iterator[T]]:
    """`items`, closed afterwards if it can be (a generator stops where it is and runs its cleanup)."""
    try:
        yield items
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error
