"""adapter.device_work: model work holding its lock, on the calling thread by default and on the device's compute
thread once a server started one: results and errors handed back, work within work, streams that run only as far
as their reader asks and free the device when closed. The compute thread here is the meta device's, so that the
CPU's (which the app tests start) is left alone."""

from __future__ import annotations

import threading

import pytest

from adapter.device_work import DeviceWork, start_compute_thread


def where() -> str:
    return threading.current_thread().name


def test_without_a_compute_thread_work_runs_here_holding_the_lock():
    lock = threading.Lock()
    work = DeviceWork("cuda:7", lock)  # a device no test starts a compute thread for
    assert work.run(lambda: (where(), lock.locked())) == (where(), True)
    items = work.stream(lambda: iter([lock.locked(), where()]))
    assert list(items) == [True, where()] and not lock.locked()


@pytest.fixture(scope="module")
def compute():
    start_compute_thread("meta")
    return "compute:meta"


def test_work_runs_on_the_compute_thread_holding_its_lock(compute):
    lock = threading.Lock()
    work = DeviceWork("meta", lock)
    assert work.run(lambda: (where(), lock.locked())) == (compute, True)
    assert not lock.locked()
    with pytest.raises(KeyError, match="missing"):
        work.run(lambda: {}["missing"])
    assert work.run(lambda: work.run(where)) == compute, "work within work runs at once, where it is"


def test_a_job_waits_for_whoever_holds_its_lock(compute):
    lock = threading.Lock()
    work, done = DeviceWork("meta", lock), []
    with lock:
        asker = threading.Thread(target=lambda: done.append(work.run(where)))
        asker.start()
        asker.join(0.2)
        assert asker.is_alive() and not done, "the device is busy"
    asker.join(5)
    assert done == [compute]


def test_a_stream_runs_as_far_as_its_reader_and_frees_the_device_when_closed(compute):
    lock = threading.Lock()
    work, made = DeviceWork("meta", lock), []

    def produce():
        for index in range(100):
            made.append((index, where(), lock.locked()))
            yield index

    items = work.stream(produce)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    assert made == [(i, compute, True) for i in range(3)], "made on the compute thread, one per item asked"
    assert lock.locked(), "held while the reader is under way"
    items.close()
    assert not lock.locked() and len(made) == 3, "closed: the work stopped and let the device go"
    assert list(work.stream(lambda: iter(range(4)))) == [0, 1, 2, 3]

    def failing():
        yield 1
        raise ValueError("bad row")

    failed = work.stream(failing)
    assert next(failed) == 1
    with pytest.raises(ValueError, match="bad row"):
        next(failed)
    assert not lock.locked()
