"""BENCHMARKS.md is made of `## ` sections, one per benchmark; each benchmark rewrites only its own."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HEADER = ("# Benchmarks\n\nEvery figure below was written by the command shown with it; none is edited by hand. "
          "Tests never time anything.\n\n")


def replace_section(path: str | os.PathLike, heading: str, text: str) -> None:
    """Replace the section whose `## ` heading starts with `heading` (or append it), atomically."""
    path = Path(path)
    current = path.read_text() if path.exists() else HEADER
    head, *sections = current.split("\n## ")
    sections = ["## " + s.rstrip("\n") + "\n" for s in sections]
    new = text.rstrip("\n") + "\n"
    replaced = False
    for index, section in enumerate(sections):
        if section[3:].startswith(heading):
            sections[index], replaced = new, True
    if not replaced:
        sections.append(new)
    content = head.rstrip("\n") + "\n\n" + "\n".join(sections)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(content)
    os.replace(tmp, path)


def publish(text: str, heading: str, write: str | os.PathLike | None) -> None:
    """Print a benchmark's section and, with `--write FILE`, replace its section there."""
    print(text)
    if write:
        replace_section(write, heading, text)
