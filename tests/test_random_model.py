"""`python -m adapter.random_model`'s refusals: a size its tokenizer or shape cannot take is named as the flag's
field, with nothing written (no folder, no temporary one beside it); an existing folder is not written into."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.random_model import main


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size", "300"], "--vocab-size: 300 does not fit the random tokenizer: its bytes, characters and special "
                              "pieces need at least 301"),
    (["--vocab-size", "100000"], "--vocab-size: 100000 does not fit the random tokenizer: its corpus yields at most "
                                 "826 pieces"),
    (["--vocab-size", "0"], "--vocab-size: must be a positive integer, got 0"),
    (["--llama3", "--vocab-size", "300"], "--vocab-size: a tiktoken tokenizer needs at least 512 (256 bytes and 256 "
                                          "special tokens), got 300"),
    (["--shards", "3"], "--shards: tok_embeddings.weight dim 1 of size 64 does not split in 3"),  # after the tokenizer
    (["--shards", "0"], "--shards: must be a whole number from 1, got 0"),  # (a folder without weights was written)
])
def test_what_cannot_be_written_is_named_and_nothing_is_left(tmp_path, capsys, flags, message):
    assert main([str(tmp_path / "base"), *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == [], "no folder, whole or half written"


def test_an_existing_folder_is_not_written_into(tmp_path, capsys):
    assert main([str(tmp_path / "base"), "--n-layers", "1"]) == 0
    written = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "base").iterdir()}
    assert sorted(written) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    capsys.readouterr()
    assert main([str(tmp_path / "base"), "--n-layers", "2"]) == 2
    assert capsys.readouterr().err == f"error: out: {tmp_path / 'base'} already exists; name a new folder\n"
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "base").iterdir()} == written
    assert [path.name for path in tmp_path.iterdir()] == ["base"]


def test_random_demo_writes_a_new_folder_whole_and_prints_a_command_that_pastes(tmp_path, capsys):
    """(it wrote into a folder already there, mixing its files with those, tracebacked on a file, and printed paths
    with spaces unquoted)"""
    import shlex

    from adapter import random_demo

    folder = tmp_path / "demo here"
    assert random_demo.main([str(folder)]) == 0
    command = shlex.split(capsys.readouterr().out)
    assert command[:2] == ["python", "app.py"] and command[command.index("--base") + 1] == str(folder / "base")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "base", "clip"]
    assert all(Path(value).exists() for value in command[3::2])
    assert random_demo.main([str(folder)]) == 2
    assert capsys.readouterr().err == f"error: out: {folder} already exists; name a new folder\n"
    (tmp_path / "notes.txt").write_text("x")
    assert random_demo.main([str(tmp_path / "notes.txt")]) == 2 and (tmp_path / "notes.txt").read_text() == "x"
