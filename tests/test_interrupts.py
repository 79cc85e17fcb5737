"""A command writing a new folder whole, stopped by SIGTERM (`timeout`, `docker stop`, a cancelled CI job) or
Ctrl-C: its staging folder is removed and it ends in one line (SIGTERM left gigabytes of finished shards in
OUT.xxxx.tmp, and Ctrl-C printed a traceback)."""

from __future__ import annotations

import os
import signal
import time

import pytest

import adapter.merge
import adapter.quantize_base
from adapter.formats.common import atomic_folder


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C as Python meets it in a terminal (a shell's background job, as CI may run, starts with it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("command, function", [(adapter.quantize_base, "quantize_base"), (adapter.merge, "merge")])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_command_leaves_no_staging_folder_and_says_so_in_one_line(tmp_path, monkeypatch, capsys, command,
                                                                            function, signum, ctrl_c_raises):
    out = tmp_path / "out"

    def writing(*args, **options):
        def write(staging):
            (staging / "model-00001.safetensors").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the signal's handler raises here

        return atomic_folder(out, write)

    monkeypatch.setattr(command, function, writing)
    argv = ["tiny", str(out)] if command is adapter.quantize_base else ["tiny", "tiny-text", str(out)]
    assert command.main(argv) == 128 + signum
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert err == (f"{'terminated' if signum == signal.SIGTERM else 'interrupted'}: {out} is written whole or not at "
                   "all (no half-written folder is left)\n")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "SIGTERM's handler put back"


def test_a_replacing_write_stopped_between_its_renames_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    """(the earlier run's folder was left in an `.old` folder beside a missing `out`)"""
    from adapter.formats import common

    out = tmp_path / "pictures"
    out.mkdir()
    (out / "earlier.png").write_bytes(b"earlier")
    renames = []

    def rename(source, target):
        renames.append(target)
        if len(renames) == 2:  # the new folder's rename, after the earlier one was moved aside
            raise KeyboardInterrupt
        os.replace(source, target)

    monkeypatch.setattr(common.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_folder(out, lambda staging: (staging / "new.png").write_bytes(b"new"), replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["pictures"]
    assert [p.name for p in out.iterdir()] == ["earlier.png"]
    monkeypatch.undo()
    atomic_folder(out, lambda staging: (staging / "new.png").write_bytes(b"new"), replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["pictures"] and [p.name for p in out.iterdir()] == ["new.png"]
