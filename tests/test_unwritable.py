"""A folder that may not be written into (a read-only disk, another user's folder) is named by every command line
that would write there, before its work: each wrote its result only at the end, after the training, the answers or
the quantization, and then failed naming a temporary file ("Read-only file system: '/out/q.dv0qm7pd.tmp'").

The folder is made unwritable by os.access's answer (the tests may run as root, whom no mode stops); a read-only
disk was checked by hand, on a read-only tmpfs (session 49's note)."""

from __future__ import annotations

import importlib
import os

import pytest

from adapter.app_config import tiny_available

pytestmark = pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")


@pytest.fixture
def held_out(tmp_path):
    from adapter.tiny.evaluate import held_out
    from adapter.tiny.records import write_text_records

    return write_text_records(held_out("text", 0, 4), tmp_path / "held_out.jsonl")


@pytest.mark.parametrize("module, arguments, flag", [
    ("adapter.finetune.cli", ["--base", "tiny", "--data", "{data}", "--out", "{out}/run"], "--out: {out}/run"),
    ("adapter.generate", ["--base", "tiny", "--prompts-file", "{data}", "--out", "{out}/answers.jsonl"],
     "--out: {out}/answers.jsonl"),
    ("adapter.evaluate", ["--base", "tiny", "--data", "{data}", "--plot", "{out}/scores.png"],
     "--plot: {out}/scores.png"),
    ("adapter.quantize_base", ["tiny", "{out}/nf4"], "out: {out}/nf4"),
    ("adapter.merge", ["tiny", "tiny-text", "{out}/merged"], "out: {out}/merged"),
    ("adapter.push", ["tiny-text", "me/tiny-text", "--base", "tiny", "--folder", "{out}/staged"], "out: {out}/staged"),
    ("adapter.convert", ["tiny-text", "{out}/converted", "--to", "native", "--base", "tiny"],
     "target: {out}/converted"),
])
def test_an_unwritable_folder_is_named_before_the_work(tmp_path, held_out, monkeypatch, capsys, module, arguments,
                                                      flag):
    out = tmp_path / "read-only"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: not (
        mode & os.W_OK and os.fspath(path) == os.fspath(out)) and real(path, mode, **kwargs))
    import torch

    def no_work(*args, **kwargs):  # the tiny base's weights are a torch file: reading them is the work's start
        raise AssertionError("the base was read: the refusal came after the work began")

    monkeypatch.setattr(torch, "load", no_work)
    argv = [argument.format(data=held_out, out=out) for argument in arguments]
    assert importlib.import_module(module).main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"error: {flag.format(out=out)} cannot be written: {out} may not be written into here (a "
                     "read-only disk, or another user's folder)")
    assert list(out.iterdir()) == []
