"""What differs on Windows and macOS that Linux never shows: here, that every text file the project reads or writes
names its encoding. Python opens text in the locale's encoding (cp1252 on most Windows machines, Python < 3.15),
so a model card naming a folder "模型" could not be written there, and a UTF-8 file read back garbled."""

from __future__ import annotations

import ast
from pathlib import Path

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
