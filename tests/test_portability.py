"""What differs on Windows and macOS that Linux never shows: here, that every text file the project reads or writes
names its encoding. Python opens text in the locale's encoding (cp1252 on most Windows machines, Python < 3.15),
so a model card naming a folder "模型" could not be written there, and a UTF-8 file read back garbled; and that the
commands' output is not written in that code page either, where an answer's emoji stopped them half-way."""

from __future__ import annotations

import ast
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.arg_types import unicode_output

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "app.py", *sorted((ROOT / "adapter").rglob("*.py")), *sorted((ROOT / "bench").rglob("*.py")),
           *sorted((ROOT / "docs").rglob("*.py"))]
NOT_FILES = {"os", "Image", "gzip", "tarfile", "zipfile", "webbrowser"}  # their open() is no text file's


def _constant(node: ast.expr | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _mode(call: ast.Call, position: int) -> object:
    """The mode argument of an open()-like call, "r" where none is given, None where it is not a constant."""
    given = next((k.value for k in call.keywords if k.arg == "mode"),
                 call.args[position] if len(call.args) > position else None)
    return "r" if given is None else _constant(given)


def implicit_encodings(source: str) -> list[tuple[int, str]]:
    """(line, call) of each text read or write in `source` that leaves the encoding to the locale."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or any(k.arg in ("encoding", None) for k in node.keywords):
            continue
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        owner = getattr(function.value, "id", None) if isinstance(function, ast.Attribute) else None
        if name in ("read_text", "write_text"):
            text = True
        elif name == "open" and owner not in NOT_FILES:
            method = isinstance(function, ast.Attribute) and owner != "io"  # Path.open(mode), not open(file, mode)
            mode = _mode(node, 0 if method else 1)
            text = not isinstance(mode, str) or "b" not in mode
        elif name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile"):
            mode = next((_constant(k.value) for k in node.keywords if k.arg == "mode"), "w+b")
            text = not isinstance(mode, str) or "b" not in mode
        else:
            text = False
        if text:
            found.append((node.lineno, ast.unparse(node)[:80]))
    return found


def test_every_text_file_is_read_and_written_as_utf8():
    implicit = [f"{path.relative_to(ROOT)}:{line}: {call}" for path in SOURCES
                for line, call in implicit_encodings(path.read_text(encoding="utf-8"))]
    assert implicit == [], "name the encoding (encoding=\"utf-8\"):\n" + "\n".join(implicit)


def test_the_scan_sees_each_way_of_leaving_the_encoding_to_the_locale():
    source = """
Path("a").read_text()
Path("a").write_text(card)
open(path)
open(path, "a")
self.path.open("w")
tempfile.TemporaryFile(mode="w+")
Path("a").read_text(encoding="utf-8")
open(path, "rb")
path.open(mode="wb")
Image.open(path)
os.open(path, os.O_RDONLY)
tempfile.TemporaryFile()
open(path, **options)
"""
    assert [line for line, _ in implicit_encodings(source)] == [2, 3, 4, 5, 6, 7]


COMMANDS = [path for path in (ROOT / "app.py", *sorted((ROOT / "adapter").rglob("*.py")))
            if "def main(" in path.read_text(encoding="utf-8")]


def test_every_command_sets_its_output_streams_before_anything_else():
    late = []
    for path in COMMANDS:
        mains = [node for node in ast.parse(path.read_text(encoding="utf-8")).body
                 if isinstance(node, ast.FunctionDef) and node.name == "main"]
        first = mains[0].body[0] if mains else None
        if not (isinstance(first, ast.Expr) and ast.unparse(first) == "unicode_output()"):
            late.append(str(path.relative_to(ROOT)))
    assert len(COMMANDS) >= 15 and late == [], f"main() does not begin with unicode_output(): {late}"


class Console(io.TextIOWrapper):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_type", [io.TextIOWrapper, Console])
def test_output_in_a_legacy_code_page_writes_any_character(monkeypatch, stream_type):
    raw = io.BytesIO()
    stream = stream_type(raw, encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(UnicodeEncodeError):
        print("模型 ☃", flush=True)
    unicode_output()
    print("é 模型 ☃", flush=True)
    expected = "é 模型 ☃\n".encode() if stream_type is io.TextIOWrapper else "é ?? ?\n".encode("cp1252")
    assert raw.getvalue().endswith(expected)  # a file gets UTF-8; a console its own code page, '?' for the rest


def test_a_command_redirected_in_a_legacy_code_page_names_any_folder(base_folder, tmp_path):
    """As on Windows with `> out.txt`: inspect's lines name the folder, here one in Chinese with a snowman, which
    cp1252 cannot write (before: "error: 'charmap' codec can't encode characters", exit code 2)."""
    named = tmp_path / "模型" / "b☃"
    shutil.copytree(base_folder, named)
    run = subprocess.run([sys.executable, "-m", "adapter.inspect", str(named)], capture_output=True, cwd=ROOT,
                         env={**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0"}, timeout=120)
    assert run.returncode == 0, run.stderr.decode("utf-8", "replace")
    assert run.stdout.decode("utf-8").startswith(f"{named}: base LLaMA, meta format\n")
